/* Sizes (override with -D at build time) and protocol constants. */
#ifndef HALB_CONSTANTS_H
#define HALB_CONSTANTS_H

/* Virtual services (VIP:port/proto) the program can hold. */
#ifndef HALB_MAX_SERVICES
#define HALB_MAX_SERVICES 64
#endif

/* Ring slots reserved per service; a service's own ring size may be smaller. */
#ifndef HALB_RING_STRIDE
#define HALB_RING_STRIDE 65537
#endif

/* (service, backend) pairs; each has its own id, entry and counters. */
#ifndef HALB_MAX_BACKENDS
#define HALB_MAX_BACKENDS 4096
#endif

/* LRU flow table entries (about 100 bytes each in the kernel). */
#ifndef HALB_MAX_FLOWS
#define HALB_MAX_FLOWS 262144
#endif

/* flow_events ring buffer size in bytes (a power of 2, whole pages): a record is 8
 * bytes of header + 56, so 4 MiB hold ~65k new flows, 6.5 s at 10k new flows/s. */
#ifndef HALB_FLOW_EVENTS_BYTES
#define HALB_FLOW_EVENTS_BYTES (4 << 20)
#endif

#define HALB_FAMILY_V4 4
#define HALB_FAMILY_V6 6

/* service_info.flags */
#define SVC_F_TUNNEL (1U << 0)

/* lb_config.flags */
#define CFG_F_FLOW_EVENTS (1U << 0) /* emit flow_events (armed while a source consumes) */

/* flow_value.flags */
#define FLOW_F_CLOSING (1U << 0) /* TCP FIN or RST seen: the closing timeout applies */

/* backend_info.flags */
#define BACKEND_F_VALID (1U << 0)
#define BACKEND_F_TUNNEL (1U << 1) /* the owning service forwards by tunnel */

/* stats_global indices */
#define STAT_DEADLINE_DROP 0
#define STAT_NO_BACKEND 1
#define STAT_ENCAP_FAIL 2
#define STAT_ARP_FENCE_DROP 3 /* ARP requests for a VIP address past the deadline */
#define STAT_NS_FENCE_DROP 4  /* IPv6 neighbour solicitations for one, likewise */
#define STAT_EVENT_LOST 5     /* flow_events full: a new flow nobody was told of */
#define STAT_FLOW_EXPIRED 6   /* a packet found its flow idle past its timeout */
#define STAT_FLOW_SWEPT 7     /* written by user space: idle flows the scans deleted */
#define STAT_FRAG_DROP 8      /* IPv4 fragments for a VIP address */
#define STAT_ICMP_RELAYED 9   /* frag-needed / packet-too-big sent on to a flow's backend */
#define STAT_MAX 16

#define ETH_P_IPV4 0x0800
#define ETH_P_IPV6_ 0x86DD
#define ETH_P_ARP_ 0x0806
#define ARPOP_REQUEST_ 1
#define ICMPV6_NS 135
#define ICMPV6_PKT_TOOBIG_ 2
#define ICMP_DEST_UNREACH_ 3
#define ICMP_FRAG_NEEDED_ 4
#define IPPROTO_ICMPV6_ 58
#define IP_MF_ 0x2000
#define IP_OFFSET_ 0x1FFF
#define IP_DF_ 0x4000
#define ENCAP_TTL 64
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

#endif
