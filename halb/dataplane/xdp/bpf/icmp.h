/* ICMP errors about a VIP flow, and IPv4 fragments for a VIP.
 *
 * Path-MTU discovery with dsr or tunnel: the backend answers the client directly from
 * the VIP, so a router that cannot forward such a reply sends "fragmentation needed"
 * (ICMPv4 3/4) or "packet too big" (ICMPv6 2/0) to the VIP, i.e. to this node. The
 * error quotes the reply's header: inner source = the VIP, inner destination = the
 * client. Only the flow's backend can use it (it lowers its path MTU toward the
 * client), so it is forwarded to that backend the way the flow's packets are (dsr: MAC
 * rewrite; tunnel: encapsulated): the flow entry, or for a flow not (or no longer) in
 * the table, the ring slot its next packet would take. Errors quoting a packet whose
 * VIP side is not a service pass to the stack as before.
 *
 * IPv4 fragments: only the first carries the ports, so none can be balanced
 * consistently; the stack holds the VIP and would answer them itself (a RST for TCP).
 * Fragments for a VIP address are dropped and counted instead. */
#ifndef HALB_ICMP_H
#define HALB_ICMP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "constants.h"
#include "maps.h"
#include "parse.h"
#include "structs.h"

/* Whether the packet's destination (pkt->key.dst, family) is a VIP address: the VIP
 * filter first (an array read), then vip_addrs. */
static __always_inline int is_vip_addr(const struct packet *pkt)
{
	struct vip_addr va = {};
	__u32 last, *vips;

	last = ((__u8 *)pkt->key.dst)[pkt->key.family == HALB_FAMILY_V4 ? 3 : 15];
	vips = bpf_map_lookup_elem(&vip_filter, &last);
	if (!vips || !*vips)
		return 0;
	__builtin_memcpy(va.addr, pkt->key.dst, sizeof(va.addr));
	va.family = pkt->key.family;
	return bpf_map_lookup_elem(&vip_addrs, &va) != 0;
}

/* The flow an ICMP error quotes, as the flows map keys it: the quoted header's VIP
 * side (the address equal to the error's own destination) is the flow's destination.
 * 0 = a quoted TCP/UDP packet of such a flow; -1 = anything else. */
static __always_inline int quoted_flow(const struct packet *outer, const __u32 *isrc,
				       const __u32 *idst, __u8 proto, const __u16 *ports,
				       struct flow_key *key)
{
	int words = outer->key.family == HALB_FAMILY_V4 ? 1 : 4;
	int from_vip = 1, to_vip = 1;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return -1;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (i < words) {
			from_vip &= isrc[i] == outer->key.dst[i];
			to_vip &= idst[i] == outer->key.dst[i];
		}
	}
	key->proto = proto;
	key->family = outer->key.family;
	if (from_vip) { /* a reply from the VIP (dsr: sent by the backend) */
		__builtin_memcpy(key->src, idst, 4 * words);
		__builtin_memcpy(key->dst, isrc, 4 * words);
		key->sport = ports[1];
		key->dport = ports[0];
		return 0;
	}
	if (to_vip) { /* a packet to the VIP, quoted back to it */
		__builtin_memcpy(key->src, isrc, 4 * words);
		__builtin_memcpy(key->dst, idst, 4 * words);
		key->sport = ports[0];
		key->dport = ports[1];
		return 0;
	}
	return -1;
}

/* For an ICMP / ICMPv6 packet to a VIP (parse_packet said PARSE_ICMP): fill key with
 * the quoted flow of a frag-needed / packet-too-big error. 0 = one; -1 = not one. */
static __always_inline int parse_too_big(void *data, void *data_end, const struct packet *outer,
					 struct flow_key *key)
{
	struct ethhdr *eth = data;

	if (outer->key.family == HALB_FAMILY_V4) {
		struct iphdr *iph = (void *)(eth + 1);
		struct iphdr *inner;
		__u8 *icmp;
		__u16 *ports;

		if ((void *)(iph + 1) > data_end)
			return -1;
		icmp = (void *)iph + iph->ihl * 4;
		if ((void *)(icmp + 8) > data_end)
			return -1;
		if (icmp[0] != ICMP_DEST_UNREACH_ || icmp[1] != ICMP_FRAG_NEEDED_)
			return -1;
		inner = (void *)(icmp + 8);
		if ((void *)(inner + 1) > data_end || inner->version != 4 || inner->ihl < 5)
			return -1;
		ports = (void *)inner + inner->ihl * 4;
		if ((void *)(ports + 2) > data_end)
			return -1;
		return quoted_flow(outer, &inner->saddr, &inner->daddr, inner->protocol, ports, key);
	}
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct ipv6hdr *inner;
	__u8 *icmp = (void *)(ip6 + 1);
	__u16 *ports;

	if ((void *)(icmp + 8) > data_end)
		return -1;
	if (icmp[0] != ICMPV6_PKT_TOOBIG_ || icmp[1] != 0)
		return -1;
	inner = (void *)(icmp + 8);
	ports = (void *)(inner + 1);
	if ((void *)(ports + 2) > data_end || inner->version != 6)
		return -1;
	return quoted_flow(outer, (__u32 *)&inner->saddr, (__u32 *)&inner->daddr, inner->nexthdr,
			   ports, key);
}

#endif
