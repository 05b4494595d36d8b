// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
/* halb XDP balancer: VIP:port/proto match, LRU flow table, Maglev ring, dsr / tunnel.
 *
 * Per packet: parse -> VIP filter on the destination's last byte (no VIP ends in it:
 * XDP_PASS) -> flow table (hit with a live backend: the backend entry names
 * its service, so the services hash is not read) -> else service lookup (miss:
 * XDP_PASS) and ring slot (hash % ring_size), recording the flow -> dead-man deadline
 * -> counters -> rewrite and XDP_TX. A flow idle past its timeout (expiry.h) is a miss. Frames that are not TCP/UDP go to the ARP / ND
 * fence (fence.h) and otherwise pass.
 *
 * Flow hit first: one hash lookup per packet in the steady state instead of two (each
 * costs 12-17 ns here, as much as the rest of the path). Traffic for other addresses
 * stops at the filter; only one whose last byte matches a VIP's pays a flow-table
 * miss before the services lookup. */
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

/* Benchmark only (HALB_BENCH_*, never defined in a real build): bench/xdp_cost.py builds
 * throw-away variants that return XDP_TX at stage n (-DHALB_BENCH_STOP=n), leave one
 * part out, or do it the previous way, to measure where the hit path spends its time. */
#ifdef HALB_BENCH_STOP
#define BENCH_STAGE(n)                      \
	do {                                \
		if (HALB_BENCH_STOP == (n)) \
			return XDP_TX;      \
	} while (0)
#else
#define BENCH_STAGE(n) \
	do {           \
	} while (0)
#endif

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
	nv.last_seen_ns = now;
	if (bpf_map_update_elem(&flows, FLOW_KEY(pkt), &nv, BPF_ANY) == 0)
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
	__u32 zero = 0, hash, backend_id = 0, last, *vips;
	__u64 now;

	last = ((__u8 *)pkt->key.dst)[pkt->key.family == HALB_FAMILY_V4 ? 3 : 15];
	vips = bpf_map_lookup_elem(&vip_filter, &last);
	if (!vips || !*vips)
		return -1;
	if (parse_too_big(data, data_end, pkt, &flow.key))
		return -1;
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return -1;
	now = coarse_now();
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
	if (data + sizeof(struct ethhdr) > data_end)
		return XDP_DROP;
	set_macs(data, be, cfg);
	return XDP_TX;
}

SEC("xdp")
int halb_balancer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 frame_len = data_end - data;
	const struct backend_info *be = 0;
	const struct service_info *svc = 0;
	struct flow_value *fv;
	struct packet pkt = {};
	struct lb_config *cfg;
	__u32 zero = 0, backend_id = 0, hash = 0, last, *vips;
	__u64 now;
	int parsed, verdict;

	parsed = parse_packet(data, data_end, &pkt);
	if (parsed == PARSE_FRAG)
		return fragment_verdict(&pkt, frame_len);
	if (parsed == PARSE_ICMP) {
		verdict = icmp_relay(ctx, data, data_end, &pkt, frame_len);
		if (verdict >= 0)
			return verdict;
	}
	if (parsed != PARSE_FLOW)
		return fence_neigh(data, data_end);
	last = ((__u8 *)pkt.key.dst)[pkt.key.family == HALB_FAMILY_V4 ? 3 : 15];
	vips = bpf_map_lookup_elem(&vip_filter, &last);
	if (!vips || !*vips)
		return XDP_PASS;
	BENCH_STAGE(1);

#ifdef HALB_BENCH_SERVICE_LOOKUP /* comparison variant: the services hash on every packet */
	if (!service_of(&pkt))
		return XDP_PASS;
#endif
	/* An array entry (the verifier inlines the lookup); the clock is read once for the
	 * deadline, expiry and the flow's stamp. */
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return XDP_DROP;
	now = coarse_now();
	fv = bpf_map_lookup_elem(&flows, FLOW_KEY(&pkt));
	if (fv) {
		if (!flow_expired(fv, pkt.key.proto, cfg, now)) {
			backend_id = fv->backend_id;
			be = live_backend(backend_id);
		} else {
			count(&stats_global, STAT_FLOW_EXPIRED, frame_len);
		}
	}
	BENCH_STAGE(2);
#ifdef HALB_BENCH_ALWAYS_MISS /* bench variant: every packet takes the miss path */
	be = 0;
#endif
	if (!be) {
		svc = service_of(&pkt);
		if (!svc)
			return XDP_PASS;
	}
	/* VIP traffic only; checked before a flow is recorded, so a fenced node learns
	 * nothing new. */
#ifndef HALB_BENCH_NO_DEADLINE /* ablation variant: what the check costs */
	if (deadline_passed(cfg, now)) {
		count(&stats_global, STAT_DEADLINE_DROP, frame_len);
		return XDP_DROP;
	}
#endif
	if (!be) {
		hash = flow_hash(&pkt.key);
		be = ring_backend(&pkt, svc, cfg, frame_len, hash, now, &backend_id);
		if (!be) {
			count(&stats_global, STAT_NO_BACKEND, frame_len);
			return XDP_DROP;
		}
	} else if (fv) { /* always, on a hit; the verifier cannot tell */
#ifndef HALB_BENCH_NO_TOUCH /* ablation variant: the hit without its stamp */
		flow_touch(fv, pkt.tcp_flags, now);
#endif
	}
	BENCH_STAGE(3);
#ifndef HALB_BENCH_NO_COUNTERS /* ablation variant: what the counters cost */
	count(&stats_service, be->service, frame_len);
	count(&stats_backend, backend_id, frame_len);
#endif
	BENCH_STAGE(4);

	if (be->flags & BACKEND_F_TUNNEL) {
		if (!hash) /* a flow hit: the hash is only needed for the flow label */
			hash = flow_hash(&pkt.key);
		verdict = encap_tunnel(ctx, &pkt, be, cfg, hash);
		if (verdict != XDP_TX)
			count(&stats_global, STAT_ENCAP_FAIL, frame_len);
		return verdict;
	}
	if (data + sizeof(struct ethhdr) > data_end)
		return XDP_DROP;
	set_macs(data, be, cfg);
	return XDP_TX;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
