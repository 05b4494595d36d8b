// SPDX-License-Identifier: GPL-2.0
/* PROXY protocol insertion for full-NAT flows (issue 17), two TC programs:
 *
 *   halb_pp_egress   on the interface toward the backends, egress (after nft's NAT:
 *                    the client -> backend direction with post-NAT addresses)
 *   halb_pp_ingress  on the same interface, ingress (backend -> client, before de-NAT)
 *
 * A flow of a PROXY service has a pp_flows entry (key: the post-NAT 4-tuple) with the
 * header to insert at the client's ISN + 1. The header goes out on the handshake's
 * final pure ACK as its payload (loxilb-ebpf #87: a first data segment may be a GSO
 * super-packet), or before the first segment's payload when the client's first packet
 * after the SYN-ACK already carries data. From then on every client segment's seq moves
 * up by the header's length and every backend segment's ack and SACK edges move down
 * (loxilb #675). Conntrack runs before egress and after ingress, so it only ever sees
 * the client's own sequence space.
 *
 * Checksums are updated incrementally with the helpers, which also keep a partially
 * offloaded (CHECKSUM_PARTIAL) checksum right: payload changes are non-pseudo diffs that
 * the kernel ignores there, length changes are pseudo-header diffs. Each change is
 * counted once (loxilb-ebpf #93).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "structs.h"
#include "maps.h"
#include "parse.h"
#include "csum.h"

#define PP_TCP_CSUM 16 /* offset of the checksum in the TCP header */

static __always_inline int seq_after_eq(__u32 a, __u32 b)
{
	return (__s32)(a - b) >= 0;
}

/* A backend sequence number (ack or SACK edge) in the client's space: past the header
 * it moves down by its length; inside the header (the backend has part of it) it is the
 * insertion point, so the client never sees an ack of bytes it did not send. */
static __always_inline __u32 to_client(__u32 v, __u32 isn_next, __u32 hdr_len)
{
	if (seq_after_eq(v, isn_next + hdr_len))
		return v - hdr_len;
	if (seq_after_eq(v, isn_next))
		return isn_next;
	return v;
}

/* IP length field for a TCP segment of new_l4_len bytes (IPv4: with its checksum). */
static __always_inline int set_ip_len(struct __sk_buff *skb, struct pp_pkt *p, __u32 new_l4_len)
{
	__u32 iph = p->l4 - p->l3;
	__u16 old, new;

	if (p->family == PP_FAMILY_V4) {
		old = bpf_htons(iph + p->l4_len);
		new = bpf_htons(iph + new_l4_len);
		if (bpf_l3_csum_replace(skb, p->l3 + 10, old, new, 2))
			return -1;
		return bpf_skb_store_bytes(skb, p->l3 + 2, &new, 2, 0);
	}
	new = bpf_htons(new_l4_len);
	return bpf_skb_store_bytes(skb, p->l3 + 4, &new, 2, 0);
}

/* Ones' complement sum of the segment's payload, derived from its checksum field:
 * check = ~(pseudo + header + payload). Meaningless for CHECKSUM_PARTIAL (the field then
 * holds the pseudo-header sum only), where the diffs built from it are ignored anyway. */
static __always_inline __u16 payload_sum(struct pp_pkt *p, __u8 *th, __u32 th_len)
{
	__u32 sum = bpf_csum_diff(0, 0, (__be32 *)p->key.local, 32, 0); /* both addresses */

	sum = pp_csum_add(sum, bpf_htons(IPPROTO_TCP));
	sum = pp_csum_add(sum, bpf_htons(p->l4_len));
	sum = pp_csum_add(sum, bpf_csum_diff(0, 0, (__be32 *)th, th_len, 0));
	return (__u16)~pp_csum_fold(sum);
}

/* Is the segment with `grow` more bytes larger than the path toward the backend? */
static __always_inline int too_big(struct __sk_buff *skb, struct pp_pkt *p, __u32 grow)
{
	__u32 key = 0, mtu_len = 0;
	struct pp_config *cfg = bpf_map_lookup_elem(&pp_config, &key);

	if (cfg && cfg->mtu)
		return p->l4 - p->l3 + p->l4_len + grow > cfg->mtu;
	return bpf_check_mtu(skb, 0, &mtu_len, grow, 0) != BPF_MTU_CHK_RET_SUCCESS;
}

/* Replace the 32-bit word at TCP offset `at` (seq 4, ack 8) in place, then the checksum:
 * a direct write costs 15-20 ns less than bpf_skb_store_bytes on this path that every
 * segment of the flow takes (the verifier unclones a cloned skb first; forwarded
 * packets are not clones). The checksum helper keeps CHECKSUM_PARTIAL right. */
static __always_inline int set_word(struct __sk_buff *skb, struct pp_pkt *p, __u32 at,
				    __be32 from, __be32 to)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__u32 off = p->l4 + at;
	__be32 *w;

	PP_OPAQUE(off);
	if (off > 74 + 8)
		return -1;
	w = data + off;
	if ((void *)(w + 1) > end)
		return -1;
	*w = to;
	return bpf_l4_csum_replace(skb, p->l4 + PP_TCP_CSUM, from, to, 4);
}

/* Move the payload [l4 + th_len, end) up by hlen bytes (the tail already grown), in
 * PP_CHUNK pieces from the end down, through a per-CPU scratch buffer. bpf_loop: a
 * plain loop over an unknown length makes the verifier walk every iteration's states. */
struct pp_move {
	struct __sk_buff *skb;
	struct pp_chunk *buf;
	__u32 start;
	__u32 left;
	__u32 hlen;
	int err;
};

static long move_chunk(__u32 index, void *arg)
{
	struct pp_move *m = arg;
	__u64 n = m->left > PP_CHUNK ? PP_CHUNK : m->left;

	PP_OPAQUE(n);
	if (n < 1 || n > PP_CHUNK) {
		m->err = m->left != 0;
		return 1;
	}
	m->left -= n;
	if (bpf_skb_load_bytes(m->skb, m->start + m->left, m->buf->b, n) ||
	    bpf_skb_store_bytes(m->skb, m->start + m->left + m->hlen, m->buf->b, n, 0)) {
		m->err = 1;
		return 1;
	}
	return m->left == 0;
}

static __always_inline int move_payload(struct __sk_buff *skb, struct pp_pkt *p, __u64 hlen)
{
	__u32 zero = 0;
	struct pp_move m = {
		.skb = skb,
		.buf = bpf_map_lookup_elem(&pp_scratch, &zero),
		.start = p->l4 + p->th_len,
		.left = p->l4_len - p->th_len,
		.hlen = hlen,
	};

	if (!m.buf)
		return -1;
	bpf_loop(PP_MOVE_CHUNKS, move_chunk, &m, 0);
	return m.err || m.left ? -1 : 0;
}

enum { PP_APPEND, PP_BEFORE, PP_TRIM };

/* Put the header at the insertion point. Returns the stat to count, or -1 after a
 * failure (the packet may be half rewritten: the caller drops it). */
static __always_inline int insert(struct __sk_buff *skb, struct pp_pkt *p, struct pp_flow *f,
				  __u32 hdr_len, __u32 mode)
{
	__u8 th[PP_TH_MAX] = {};
	/* 64-bit sizes: with 32-bit ones clang checks a zero-extended copy and passes the
	 * unchecked register to the helper, which the verifier rejects */
	__u64 th_len = p->th_len, hlen = hdr_len, words;
	__u32 new_l4_len, diff;
	__u16 d = 0, fin_old = 0, fin_new = 0;

	PP_OPAQUE(th_len);
	PP_OPAQUE(hlen);
	if (th_len < 20 || th_len > PP_TH_MAX || hlen < 1 || hlen > HALB_PP_MAX_HDR ||
	    bpf_skb_load_bytes(skb, p->l4, th, th_len))
		return -1;
	/* f->hdr is zero after hdr_len, so the rounded-up words sum the header alone */
	words = (hlen + 3) & ~3ULL;
	PP_OPAQUE(words);
	if (words > HALB_PP_MAX_HDR)
		return -1;
	diff = bpf_csum_diff(0, 0, (__be32 *)f->hdr, words, 0);

	if (mode != PP_APPEND)
		d = payload_sum(p, th, th_len);

	if (mode == PP_BEFORE) {
		/* Grow the tail and move the payload up by hdr_len, last chunk first. Not
		 * bpf_skb_adjust_room: it opens room after the fixed IP header, and moving
		 * the TCP header back in front of it would leave a CHECKSUM_PARTIAL skb's
		 * csum_start (and transport header) pointing into the inserted bytes. */
		new_l4_len = p->l4_len + hdr_len;
		if (bpf_skb_change_tail(skb, p->l4 + new_l4_len, 0) || move_payload(skb, p, hlen))
			return -1;
		/* the payload moved by hdr_len bytes: an odd shift swaps its byte pairs */
		diff = pp_csum_add(diff, hdr_len & 1 ? pp_swab16(d) : d);
		diff = pp_csum_add(diff, (__u16)~d);
	} else {
		new_l4_len = th_len + hdr_len;
		if (bpf_skb_change_tail(skb, p->l4 + new_l4_len, 0))
			return -1;
		if (mode == PP_TRIM) {
			diff = pp_csum_add(diff, (__u16)~d);
			if (p->th.fin) {
				/* the FIN came after the data we leave to a retransmission */
				__builtin_memcpy(&fin_old, th + 12, 2);
				th[13] &= ~1;
				__builtin_memcpy(&fin_new, th + 12, 2);
				if (bpf_skb_store_bytes(skb, p->l4 + 13, th + 13, 1, 0) ||
				    bpf_l4_csum_replace(skb, p->l4 + PP_TCP_CSUM, fin_old, fin_new, 2))
					return -1;
			}
		}
	}
	if (bpf_skb_store_bytes(skb, p->l4 + th_len, f->hdr, hlen, 0) ||
	    set_ip_len(skb, p, new_l4_len) ||
	    bpf_l4_csum_replace(skb, p->l4 + PP_TCP_CSUM, bpf_htons(p->l4_len),
				bpf_htons(new_l4_len), BPF_F_PSEUDO_HDR | 2) ||
	    bpf_l4_csum_replace(skb, p->l4 + PP_TCP_CSUM, 0, diff, 0))
		return -1;

	if (f->state != PP_PENDING)
		return PP_STAT_REINSERTED;
	f->state = PP_SENT;
	if (mode == PP_APPEND)
		return PP_STAT_INSERTED;
	return mode == PP_TRIM ? PP_STAT_TRIMMED : PP_STAT_INSERTED_DATA;
}

SEC("tc")
int halb_pp_egress(struct __sk_buff *skb)
{
	struct pp_pkt p;
	struct pp_flow *f;
	__u32 seq, hdr_len, mode;
	__be32 nseq;
	int stat;

	if (pp_parse(skb, &p, 1))
		return TC_ACT_OK;
	f = bpf_map_lookup_elem(&pp_flows, &p.key);
	if (!f)
		return TC_ACT_OK;
	seq = bpf_ntohl(p.th.seq);
	if (p.th.syn) {
		if (p.th.ack)
			return TC_ACT_OK;
		if (f->state != PP_PENDING && f->state != PP_MISSED) {
			/* a new connection on the tuple of one whose header went out: the
			 * entry is stale (its delete is late), never a header from it */
			f->state = PP_MISSED;
			pp_count(PP_STAT_MISSED);
		} else if (!(f->flags & PP_F_ISN)) {
			f->isn_next = seq + 1;
			f->flags |= PP_F_ISN;
		}
		return TC_ACT_OK;
	}
	if (f->state == PP_MISSED)
		return TC_ACT_OK;
	hdr_len = f->hdr_len;
	if (!(f->flags & PP_F_ISN) || hdr_len == 0 || hdr_len > HALB_PP_MAX_HDR) {
		/* written after the handshake, or with nothing to insert: hands off */
		f->state = PP_MISSED;
		pp_count(PP_STAT_MISSED);
		return TC_ACT_OK;
	}
	if (seq == f->isn_next && f->state != PP_ACKED && !p.th.rst) {
		/* The first segment, or a segment at the same seq before the backend has
		 * acknowledged the header: the same header bytes at the same seq again. */
		if (p.l4_len == p.th_len)
			mode = PP_APPEND;
		else if (skb->gso_size || p.l4_len - p.th_len > PP_CHUNK * PP_MOVE_CHUNKS ||
			 too_big(skb, &p, hdr_len))
			/* Never grow a data segment past the MTU or a GSO packet (the header
			 * would not follow its segments, loxilb #1044). */
			mode = PP_TRIM;
		else
			mode = PP_BEFORE;
		if (mode != PP_TRIM || f->state == PP_PENDING || (f->flags & PP_F_LOST))
			goto rewrite;
		/* A full-sized first data segment after the header went out on the pure
		 * ACK: the header is there unless the backend said otherwise (PP_F_LOST),
		 * so the data just moves instead of costing a retransmission. */
	}
	if (f->state == PP_PENDING) {
		if (seq_after_eq(seq, f->isn_next + 1)) {
			/* data went out before the entry existed: never insert mid-stream */
			f->state = PP_MISSED;
			pp_count(PP_STAT_MISSED);
		}
		return TC_ACT_OK;
	}
	nseq = bpf_htonl(seq + hdr_len);
	if (set_word(skb, &p, 4, p.th.seq, nseq)) {
		pp_count(PP_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	pp_count(PP_STAT_SEQ_ADJUSTED);
	return TC_ACT_OK;

rewrite:
	/* PP_TRIM sends the header alone in the segment's place: the backend acks the
	 * header only, the client retransmits its data, and that copy (PP_ACKED by then)
	 * just moves by hdr_len. */
	stat = insert(skb, &p, f, hdr_len, mode);
	if (stat < 0) {
		pp_count(PP_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	pp_count(stat);
	return TC_ACT_OK;
}

static __always_inline __u32 get32(__u8 *b, __u32 o)
{
	return ((__u32)b[o & 63] << 24) | ((__u32)b[(o + 1) & 63] << 16) |
	       ((__u32)b[(o + 2) & 63] << 8) | b[(o + 3) & 63];
}

static __always_inline void put32(__u8 *b, __u32 o, __u32 v)
{
	b[o & 63] = v >> 24;
	b[(o + 1) & 63] = v >> 16;
	b[(o + 2) & 63] = v >> 8;
	b[(o + 3) & 63] = v;
}

SEC("tc")
int halb_pp_ingress(struct __sk_buff *skb)
{
	struct pp_pkt p;
	struct pp_flow *f;
	__u8 old[64] = {}, th[64] = {};
	__u64 th_len;
	__u32 hdr_len, isn_next, ack = 0, v, nv = 0, i, o, end = 0, sack = 0, sacks = 0, opt0 = 0;
	__be32 nack;

	if (pp_parse(skb, &p, 0))
		return TC_ACT_OK;
	f = bpf_map_lookup_elem(&pp_flows, &p.key);
	if (!f)
		return TC_ACT_OK;
	if (p.th.syn) {
		/* the SYN-ACK acks the client's ISN + 1: learn it if user space could not */
		if (p.th.ack && !(f->flags & PP_F_ISN)) {
			f->isn_next = bpf_ntohl(p.th.ack_seq);
			f->flags |= PP_F_ISN;
		}
		return TC_ACT_OK;
	}
	if (f->state != PP_SENT && f->state != PP_ACKED)
		return TC_ACT_OK; /* nothing inserted: the backend's numbers are the client's */
	hdr_len = f->hdr_len;
	isn_next = f->isn_next;
	th_len = p.th_len;
	PP_OPAQUE(th_len);
	if (hdr_len > HALB_PP_MAX_HDR || th_len < 20 || th_len > PP_TH_MAX)
		return TC_ACT_OK;

	if (p.th.ack) {
		ack = bpf_ntohl(p.th.ack_seq);
		if (f->state == PP_SENT && seq_after_eq(ack, isn_next + hdr_len))
			f->state = PP_ACKED;
		else if (f->state == PP_SENT && ack == isn_next && !(f->flags & PP_F_LOST))
			/* the backend has none of the header after it went out: the next
			 * client segment at the insertion point carries it, whatever its size */
			f->flags |= PP_F_LOST;
		nv = to_client(ack, isn_next, hdr_len);
	}
	/* No options, or only NOP NOP timestamps (Linux's usual data segment): no SACK
	 * option to look for, so the ack is the only change. */
	if (th_len == 32 && bpf_skb_load_bytes(skb, p.l4 + 20, &opt0, 4))
		return TC_ACT_OK;
	if (th_len == 20 || (th_len == 32 && opt0 == bpf_htonl(0x0101080a)))
		goto ack_only;

	/* Other options: find the SACK option (one per segment), then move both edges of
	 * each of its blocks; the search stops there to keep the verifier's paths few. */
	if (bpf_skb_load_bytes(skb, p.l4, old, th_len))
		return TC_ACT_OK;
	i = 20;
	for (int n = 0; n < 40; n++) {
		__u8 kind, len;

		if (i + 1 >= th_len)
			break;
		kind = old[i & 63];
		if (kind == 0)
			break;
		if (kind == 1) {
			i = (i + 1) & 63;
			continue;
		}
		len = old[(i + 1) & 63];
		if (len < 2)
			break;
		if (kind == 5) {
			sack = i;
			end = i + len;
			break;
		}
		i = (i + len) & 127;
	}
	if (!sack || end > th_len)
		goto ack_only;
	__builtin_memcpy(th, old, sizeof(th));
	if (nv != ack) {
		put32(th, 8, nv);
		pp_count(PP_STAT_ACK_ADJUSTED);
	}
	for (int b = 0; b < 4; b++) {
		o = sack + 2 + 8 * b;
		if (o + 8 > end)
			break;
		v = get32(th, o);
		nv = to_client(v, isn_next, hdr_len);
		v = get32(th, o + 4);
		put32(th, o, nv);
		put32(th, o + 4, to_client(v, isn_next, hdr_len));
		sacks++;
	}
	if (sacks) {
		__u32 idx = PP_STAT_SACK_ADJUSTED;
		__u64 *c = bpf_map_lookup_elem(&pp_stats, &idx);

		if (c)
			*c += sacks;
	}
	/* one store and one checksum diff for the ack and every SACK edge together */
	if (bpf_skb_store_bytes(skb, p.l4, th, th_len, 0) ||
	    bpf_l4_csum_replace(skb, p.l4 + PP_TCP_CSUM, 0,
				bpf_csum_diff((__be32 *)old, th_len, (__be32 *)th, th_len, 0), 0))
		goto fail;
	return TC_ACT_OK;

ack_only:
	if (nv == ack)
		return TC_ACT_OK;
	nack = bpf_htonl(nv);
	if (set_word(skb, &p, 8, p.th.ack_seq, nack))
		goto fail;
	pp_count(PP_STAT_ACK_ADJUSTED);
	return TC_ACT_OK;
fail:
	pp_count(PP_STAT_ERROR);
	return TC_ACT_SHOT;
}

char _license[] SEC("license") = "GPL";
