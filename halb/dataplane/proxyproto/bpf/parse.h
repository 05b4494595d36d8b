/* Headers of an Ethernet + IPv4/IPv6 + TCP frame, read with bpf_skb_load_bytes (the
 * rewrites below move and resize the packet, which invalidates direct pointers). */
#ifndef HALB_PP_PARSE_H
#define HALB_PP_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "structs.h"

#define PP_TH_MAX 60 /* TCP header with 40 bytes of options */

struct pp_pkt {
	__u32 l3;      /* IP header offset */
	__u32 l4;      /* TCP header offset */
	__u32 l4_len;  /* TCP header + payload, from the IP length (not skb->len: a
			* frame can carry Ethernet padding after the IP packet) */
	__u32 th_len;  /* TCP header length, 20..60 */
	__u8 family;
	struct tcphdr th;
	struct pp_key key;
};

/* Read the headers in place (direct packet access, no helper calls: this is the cost
 * every packet on the interface pays, flow or not). Returns 0, -1 (not ours), or 1 when
 * the headers are not all in the linear part, which the caller fixes by pulling them
 * in (rare: forwarded and locally built packets have linear headers). */
static __always_inline int pp_read(struct __sk_buff *skb, struct pp_pkt *p, int egress)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct tcphdr *th;
	__u32 *src, *dst;

	p->l3 = ETH_HLEN;
	__builtin_memset(&p->key, 0, sizeof(p->key));
	src = egress ? p->key.local : p->key.backend;
	dst = egress ? p->key.backend : p->key.local;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = data + ETH_HLEN;
		__u32 ihl, tot;

		if ((void *)(iph + 1) > end)
			return 1;
		if (iph->version != 4 || iph->protocol != IPPROTO_TCP ||
		    (iph->frag_off & bpf_htons(0x3fff)))
			return -1;
		ihl = iph->ihl * 4;
		tot = bpf_ntohs(iph->tot_len);
		if (ihl < 20 || tot < ihl + 20)
			return -1;
		p->family = PP_FAMILY_V4;
		p->l4 = ETH_HLEN + ihl;
		p->l4_len = tot - ihl;
		src[0] = iph->saddr;
		dst[0] = iph->daddr;
		th = (void *)iph + ihl;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > end)
			return 1;
		if (ip6->nexthdr != IPPROTO_TCP)
			return -1;
		p->family = PP_FAMILY_V6;
		p->l4 = ETH_HLEN + sizeof(*ip6);
		p->l4_len = bpf_ntohs(ip6->payload_len);
		__builtin_memcpy(src, &ip6->saddr, 16);
		__builtin_memcpy(dst, &ip6->daddr, 16);
		th = (void *)(ip6 + 1);
	} else {
		return -1;
	}
	if ((void *)(th + 1) > end)
		return 1;
	if (p->l4 + p->l4_len > skb->len)
		return -1; /* truncated */
	__builtin_memcpy(&p->th, th, sizeof(p->th));
	p->th_len = p->th.doff * 4;
	if (p->th_len < 20 || p->th_len > p->l4_len)
		return -1;
	p->key.family = p->family;
	p->key.lport = egress ? p->th.source : p->th.dest;
	p->key.bport = egress ? p->th.dest : p->th.source;
	return 0;
}

/* 0 when skb is a TCP segment we can rewrite; the key is oriented egress (we are the
 * source) or ingress (the backend is the source). Fragments, IPv6 extension headers and
 * anything else return -1 and pass untouched. */
static __always_inline int pp_parse(struct __sk_buff *skb, struct pp_pkt *p, int egress)
{
	int ret = pp_read(skb, p, egress);

	if (ret <= 0)
		return ret;
	/* IPv6 + TCP with the longest options: everything the rewrites read in place */
	if (bpf_skb_pull_data(skb, skb->len < 134 ? skb->len : 134))
		return -1;
	return pp_read(skb, p, egress) ? -1 : 0;
}

#endif
