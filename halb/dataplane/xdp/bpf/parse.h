/* Header parsing: Ethernet, IPv4, IPv6, then the TCP/UDP ports.
 *
 * Only unfragmented TCP and UDP can be a VIP flow. IPv4 fragments and ICMP / ICMPv6
 * are reported with their addresses (icmp.h decides: fragments for a VIP drop, errors
 * about a VIP flow go to its backend). Everything else -- IPv6 packets with extension
 * headers (fragment header included), VLAN tags, truncated or malformed headers -- is
 * not ours. */
#ifndef HALB_PARSE_H
#define HALB_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>

#include "constants.h"
#include "structs.h"

struct packet {
	struct flow_key key;
	__u32 l3_len; /* IP header + payload, from the IP header */
	__u8 tos;
	__u8 tcp_flags; /* 0 for UDP (and a TCP header cut short after the ports) */
};

#define PARSE_FLOW 0  /* a TCP/UDP candidate described in pkt */
#define PARSE_OTHER -1 /* not ours to touch (ARP / ND: the fence looks) */
#define PARSE_FRAG 1   /* an IPv4 fragment; pkt has the addresses and family */
#define PARSE_ICMP 2   /* ICMP or ICMPv6 (after a plain IPv6 header); likewise */

/* PARSE_*. */
static __always_inline int parse_packet(void *data, void *data_end, struct packet *pkt)
{
	struct ethhdr *eth = data;
	void *l4;

	if ((void *)(eth + 1) > data_end)
		return -1;

	if (eth->h_proto == bpf_htons(ETH_P_IPV4)) {
		struct iphdr *iph = (void *)(eth + 1);

		if ((void *)(iph + 1) > data_end)
			return -1;
		if (iph->version != 4 || iph->ihl < 5)
			return -1;
		pkt->key.src[0] = iph->saddr;
		pkt->key.dst[0] = iph->daddr;
		pkt->key.proto = iph->protocol;
		pkt->key.family = HALB_FAMILY_V4;
		pkt->l3_len = bpf_ntohs(iph->tot_len);
		pkt->tos = iph->tos;
		if (iph->frag_off & bpf_htons(IP_MF_ | IP_OFFSET_))
			return PARSE_FRAG;
		if (iph->protocol == IPPROTO_ICMP)
			return PARSE_ICMP;
		if (iph->protocol != IPPROTO_TCP && iph->protocol != IPPROTO_UDP)
			return -1;
		l4 = (void *)iph + iph->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6_)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		if (ip6->version != 6)
			return -1;
		__builtin_memcpy(pkt->key.src, &ip6->saddr, 16);
		__builtin_memcpy(pkt->key.dst, &ip6->daddr, 16);
		pkt->key.proto = ip6->nexthdr;
		pkt->key.family = HALB_FAMILY_V6;
		pkt->l3_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
		pkt->tos = 0;
		if (ip6->nexthdr == IPPROTO_ICMPV6_)
			return PARSE_ICMP;
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return -1;
		l4 = ip6 + 1;
	} else {
		return -1;
	}

	/* Source and destination ports lead both the TCP and the UDP header. */
	if (l4 + 4 > data_end)
		return -1;
	pkt->key.sport = *(__u16 *)l4;
	pkt->key.dport = *(__u16 *)(l4 + 2);
	/* Flags byte at offset 13 of the TCP header: FIN / RST start the closing phase. */
	if (pkt->key.proto == IPPROTO_TCP && l4 + 14 <= data_end)
		pkt->tcp_flags = *(__u8 *)(l4 + 13);
	return 0;
}

#endif
