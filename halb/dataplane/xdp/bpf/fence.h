/* Dead-man switch. The agent arms a deadline on every successful keepalive; a node whose
 * agent is frozen or killed stops forwarding VIP traffic once it passes, and stops
 * answering address resolution for its VIP addresses (the kernel would otherwise keep
 * replying to ARP / neighbour solicitations for an address it still holds), so clients
 * move to the new active instead of being drawn back.
 *
 * The clock is jiffies (bpf_jiffies64, which the verifier inlines as a load: no helper
 * call; bpf_ktime_get_coarse_ns, the previous clock, cost ~19 ns per packet here and
 * bpf_ktime_get_ns more), one tick (1/HZ) of resolution. Jiffies and
 * CLOCK_MONOTONIC_COARSE advance together in the tick; the adapter converts the
 * deadline it is given with a pair of both read by halb_clock (balancer.bpf.c), taking
 * two ticks off, plus one for the pairing. */
#ifndef HALB_FENCE_H
#define HALB_FENCE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "constants.h"
#include "maps.h"
#include "structs.h"

/* The clock of the dead-man switch and of flow expiry, read once per VIP packet. */
static __always_inline __u64 clock_now(void)
{
	return bpf_jiffies64();
}

static __always_inline int deadline_passed(const struct lb_config *cfg, __u64 now)
{
	return cfg->deadline_jiffies && now > cfg->deadline_jiffies;
}

/* For a frame that is not a TCP/UDP candidate: XDP_DROP if it is an ARP request or an
 * IPv6 neighbour solicitation whose target is a VIP address and the deadline has
 * passed, else XDP_PASS. The frame is checked first, so other traffic never reads the
 * clock or the map. Only the Ethernet/IPv4 ARP format and solicitations right after
 * the IPv6 header (no extension headers, as RFC 4861 senders do) are recognised. */
static __always_inline int fence_neigh(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	struct vip_addr va = {};
	struct lb_config *cfg;
	__u32 zero = 0, stat;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_ARP_)) {
		/* htype 1, ptype 0x0800, hlen 6, plen 4, op; sha, spa, tha, then tpa at 24. */
		__u8 *arp = (void *)(eth + 1);

		if ((void *)(arp + 28) > data_end)
			return XDP_PASS;
		if (arp[0] != 0 || arp[1] != 1 || arp[2] != 0x08 || arp[3] != 0 || arp[4] != 6 ||
		    arp[5] != 4 || arp[6] != 0 || arp[7] != ARPOP_REQUEST_)
			return XDP_PASS;
		__builtin_memcpy(va.addr, arp + 24, 4);
		va.family = HALB_FAMILY_V4;
		stat = STAT_ARP_FENCE_DROP;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6_)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		__u8 *icmp = (void *)(ip6 + 1);

		/* type, code, checksum, reserved, then the 16-byte target address. */
		if ((void *)(icmp + 24) > data_end)
			return XDP_PASS;
		if (ip6->version != 6 || ip6->nexthdr != IPPROTO_ICMPV6_ || icmp[0] != ICMPV6_NS ||
		    icmp[1] != 0)
			return XDP_PASS;
		__builtin_memcpy(va.addr, icmp + 8, 16);
		va.family = HALB_FAMILY_V6;
		stat = STAT_NS_FENCE_DROP;
	} else {
		return XDP_PASS;
	}
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !cfg->deadline_jiffies || !deadline_passed(cfg, clock_now()))
		return XDP_PASS;
	if (!bpf_map_lookup_elem(&vip_addrs, &va))
		return XDP_PASS;
	count(&stats_global, stat, data_end - data);
	return XDP_DROP;
}

#endif
