/* The balancer's steps, as inline functions: the entry (balancer.bpf.c) composes them,
 * and bench/bpf/variants.bpf.c composes them otherwise to measure each one. */
#ifndef HALB_BALANCER_H
#define HALB_BALANCER_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "constants.h"
#include "structs.h"
#include "maps.h"
#include "parse.h"
#include "hash.h"
#include "encap.h"
#include "fence.h"
#include "expiry.h"
#include "icmp.h"

/* The destination's last address byte is one a VIP ends in (vip_filter). */
static __always_inline int vip_filter_pass(const struct packet *pkt)
{
	__u32 last = ((__u8 *)pkt->key.dst)[pkt->key.family == HALB_FAMILY_V4 ? 3 : 15];
	__u32 *vips = bpf_map_lookup_elem(&vip_filter, &last);

	return vips && *vips;
}

/* dsr: the MACs, XDP_TX (XDP_DROP if the frame is shorter than its Ethernet header). */
static __always_inline int forward_dsr(void *data, void *data_end,
				       const struct backend_info *be, const struct lb_config *cfg)
{
	if (data + sizeof(struct ethhdr) > data_end)
		return XDP_DROP;
	set_macs(data, be, cfg);
	return XDP_TX;
}

static __always_inline const struct backend_info *live_backend(__u32 id)
{
	const struct backend_info *be = bpf_map_lookup_elem(&backends, &id);

	return be && (be->flags & BACKEND_F_VALID) ? be : 0;
}

static __always_inline const struct service_info *service_of(const struct packet *pkt)
{
	struct vip_key vk = {};

	__builtin_memcpy(vk.addr, pkt->key.dst, sizeof(vk.addr));
	vk.port = pkt->key.dport;
	vk.proto = pkt->key.proto;
	vk.family = pkt->key.family;
	return bpf_map_lookup_elem(&services, &vk);
}

/* Tell the active's flow source of a flow just recorded (flowsource.py), if it
 * listens: a full ring (a consumer that fell behind) is counted, and the source rescans
 * the map when that count grows. Only the miss path gets here; hits pay nothing. */
static __always_inline void flow_event(const struct packet *pkt, const struct flow_value *fv,
				       const struct lb_config *cfg, __u64 frame_len)
{
	struct flow_event ev;

	if (!(cfg->flags & CFG_F_FLOW_EVENTS))
		return;
	__builtin_memcpy(&ev.key, &pkt->key, sizeof(ev.key));
	ev.value = *fv;
	if (bpf_ringbuf_output(&flow_events, &ev, sizeof(ev), 0))
		count(&stats_global, STAT_EVENT_LOST, frame_len);
}

/* The backend of the service's ring slot for a flow hash (0: none usable). */
static __always_inline const struct backend_info *slot_backend(const struct service_info *svc,
								__u32 hash, __u32 *backend_id)
{
	__u32 slot, *id;

	if (svc->ring_size == 0 || svc->ring_size > HALB_RING_STRIDE)
		return 0;
	slot = svc->index * HALB_RING_STRIDE + hash % svc->ring_size;
	id = bpf_map_lookup_elem(&ring, &slot);
	if (!id)
		return 0;
	*backend_id = *id;
	return live_backend(*id);
}

/* A new flow (or one whose backend left, or idle too long): the ring slot, recorded. */
static __always_inline const struct backend_info *ring_backend(struct packet *pkt,
								const struct service_info *svc,
								const struct lb_config *cfg,
								__u64 frame_len, __u32 hash,
								__u64 now, __u32 *backend_id)
{
	const struct backend_info *be;
	struct flow_value nv = {};

	be = slot_backend(svc, hash, &nv.backend_id);
	if (!be)
		return 0;
	nv.flags = flow_flags(0, pkt->tcp_flags);
	nv.last_seen = now;
	if (bpf_map_update_elem(&flows, &pkt->key, &nv, BPF_ANY) == 0)
		flow_event(pkt, &nv, cfg, frame_len);
	*backend_id = nv.backend_id;
	return be;
}

/* IPv4 fragments: dropped when for a VIP address (icmp.h), else the stack's. */
static __always_inline int fragment_verdict(const struct packet *pkt, __u64 frame_len)
{
	if (!is_vip_addr(pkt))
		return XDP_PASS;
	count(&stats_global, STAT_FRAG_DROP, frame_len);
	return XDP_DROP;
}

/* An ICMP frag-needed / ICMPv6 packet-too-big to a VIP quoting a flow of one of its
 * services goes to that flow's backend, forwarded as the flow is (icmp.h). -1: not
 * such an error (the caller goes on as for any other frame). Not recorded, not a hit. */
static __always_inline int icmp_relay(struct xdp_md *ctx, void *data, void *data_end,
				      const struct packet *pkt, __u64 frame_len)
{
	const struct backend_info *be = 0;
	const struct service_info *svc;
	const struct flow_value *fv;
	struct packet flow = {};
	struct lb_config *cfg;
	__u32 zero = 0, hash, backend_id = 0;
	__u64 now;

	if (!vip_filter_pass(pkt))
		return -1;
	if (parse_too_big(data, data_end, pkt, &flow.key))
		return -1;
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return -1;
	now = clock_now();
	fv = bpf_map_lookup_elem(&flows, &flow.key);
	if (fv && !flow_expired(fv, flow.key.proto, cfg, now))
		be = live_backend(fv->backend_id);
	hash = flow_hash(&flow.key);
	if (!be) { /* where the flow's next packet would go */
		svc = service_of(&flow);
		if (!svc)
			return -1;
		be = slot_backend(svc, hash, &backend_id);
		if (!be)
			return -1;
	}
	if (deadline_passed(cfg, now)) {
		count(&stats_global, STAT_DEADLINE_DROP, frame_len);
		return XDP_DROP;
	}
	count(&stats_global, STAT_ICMP_RELAYED, frame_len);
	if (be->flags & BACKEND_F_TUNNEL) {
		int verdict = encap_tunnel(ctx, pkt, be, cfg, hash);

		if (verdict != XDP_TX)
			count(&stats_global, STAT_ENCAP_FAIL, frame_len);
		return verdict;
	}
	return forward_dsr(data, data_end, be, cfg);
}

#endif
