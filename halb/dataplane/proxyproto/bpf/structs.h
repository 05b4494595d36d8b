/* Map keys and values of the PROXY protocol program. Python mirrors them in
 * halb/dataplane/proxyproto/layout.py; a kernel test compares both with this object's
 * BTF. Addresses are network byte order in __u32[4] (IPv4 in word 0). */
#ifndef HALB_PP_STRUCTS_H
#define HALB_PP_STRUCTS_H

#include <linux/types.h>

/* Longest header the program inserts: a v1 line is at most 107 bytes; v2 with IPv6
 * addresses is 52 (room for small TLVs). A multiple of 4: the checksum is summed in
 * 4-byte words over the zero-padded header. */
#ifndef HALB_PP_MAX_HDR
#define HALB_PP_MAX_HDR 108
#endif
#ifndef HALB_PP_MAX_FLOWS
#define HALB_PP_MAX_FLOWS 262144
#endif

#define PP_FAMILY_V4 4
#define PP_FAMILY_V6 6

/* The post-NAT connection as the backend sees it: the balancer's full-NAT source
 * address and port ("local") and the backend's. Both programs build this one key:
 * egress from (saddr, sport, daddr, dport), ingress from the reverse. */
struct pp_key {
	__u32 local[4];
	__u32 backend[4];
	__u16 lport; /* network byte order */
	__u16 bport; /* network byte order */
	__u8 family; /* PP_FAMILY_* */
	__u8 pad[3];
};

enum pp_state {
	/* Nothing inserted yet. */
	PP_PENDING = 0,
	/* Inserted at least once; the backend has not acknowledged it yet, so a client
	 * segment at the insertion point carries it again (a lost header is resent by
	 * the client's own retransmission of that segment). */
	PP_SENT = 1,
	/* The backend acknowledged the whole header: from now on every client segment,
	 * the insertion point's included, only moves by hdr_len. */
	PP_ACKED = 2,
	/* The entry came after the client's data had passed: never insert mid-stream. */
	PP_MISSED = 3,
};

/* flags */
#define PP_F_ISN 1 /* isn_next is known (written by user space, or learnt from the
		    * client's SYN or the backend's SYN-ACK) */
#define PP_F_LOST 2 /* PP_SENT, and the backend acked the insertion point after the
		     * header went out: it lacks the header (set by halb_pp_ingress) */

struct pp_flow {
	__u32 isn_next; /* client ISN + 1, host order: the header's sequence number */
	__u16 hdr_len;  /* header bytes: the offset of every later seq / ack */
	__u8 state;     /* enum pp_state */
	__u8 flags;     /* PP_F_* */
	__u8 hdr[HALB_PP_MAX_HDR]; /* the header, zero after hdr_len */
};

struct pp_config {
	/* Largest IP packet (header included) the program may make toward the backends:
	 * the path MTU. 0: the egress device's MTU, which the kernel enforces anyway. */
	__u32 mtu;
	__u32 pad;
};

/* pp_stats index (per-CPU __u64 packet counts). */
enum pp_stat {
	PP_STAT_INSERTED = 0,  /* header appended to the handshake's final pure ACK */
	PP_STAT_INSERTED_DATA, /* header inserted before a first segment's payload */
	PP_STAT_REINSERTED,    /* header sent again (retransmitted first segment) */
	PP_STAT_TRIMMED,       /* first segment too large (MTU) or GSO: the header sent alone */
	PP_STAT_SEQ_ADJUSTED,  /* client -> backend segments moved by hdr_len */
	PP_STAT_ACK_ADJUSTED,  /* backend -> client segments whose ack moved */
	PP_STAT_SACK_ADJUSTED, /* SACK blocks moved */
	PP_STAT_MISSED,        /* entry too late for the stream's start: left alone */
	PP_STAT_ERROR,         /* a helper failed mid-rewrite: the packet was dropped */
	PP_STAT_MAX,
};

#endif
