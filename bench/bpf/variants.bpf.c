// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
/* Benchmark variants of the balancer (bench/xdp_cost.py only; never shipped).
 *
 * The production entry (halb/dataplane/xdp/bpf/balancer.bpf.c) composed again from the
 * same steps (balancer.h), with -D switches that stop after a stage or leave one part
 * out or do it otherwise. Built without any switch it must behave exactly as the
 * production program: the bench checks that on every run before it measures.
 *
 *   HALB_BENCH_STOP=n          return XDP_TX after stage n (1 parse + VIP filter,
 *                              2 + config, clock, flows lookup, expiry test, backend,
 *                              3 + dead-man check and stamp, 4 + counters)
 *   HALB_BENCH_SERVICE_LOOKUP  the services hash on every packet (the previous order)
 *   HALB_BENCH_ALWAYS_MISS     every packet takes the miss path (ring + record + event)
 *   HALB_BENCH_NO_DEADLINE     without the dead-man check
 *   HALB_BENCH_NO_COUNTERS     without the service and backend counters
 *   HALB_BENCH_BACKEND_COUNTER_ONLY  the backend counter only (service totals would be
 *                              summed from their backends')
 *   HALB_BENCH_FINE_CLOCK      bpf_ktime_get_ns instead of jiffies (cost only, likewise)
 *   HALB_BENCH_COARSE_CLOCK    bpf_ktime_get_coarse_ns instead of jiffies (the clock before
 *                              jiffies; cost only: its unit is ns, so the deadline and
 *                              expiry tests are moot)
 *   HALB_BENCH_NO_EXPIRY       without the expiry test and the stamp (the hit path before
 *                              flows expired)
 *   HALB_BENCH_NO_TOUCH        with the expiry test, without the stamp
 *   HALB_BENCH_ALWAYS_TOUCH    the stamp written on every packet (not once per tick)
 *   HALB_BENCH_V4_KEY          a 16-byte IPv4-only flow key (flows_v4, this file's own)
 *   HALB_BENCH_NO_COMMON_LRU   the flows LRU with BPF_F_NO_COMMON_LRU (per-CPU LRU lists;
 *                              flows_nc, this file's own), hit and record
 */
#include "balancer.h"
#include "clock.h"

#ifdef HALB_BENCH_STOP
#define STAGE(n)                            \
	do {                                \
		if (HALB_BENCH_STOP == (n)) \
			return XDP_TX;      \
	} while (0)
#else
#define STAGE(n) \
	do {     \
	} while (0)
#endif

static __always_inline __u64 bench_now(void)
{
#if defined(HALB_BENCH_FINE_CLOCK)
	return bpf_ktime_get_ns();
#elif defined(HALB_BENCH_COARSE_CLOCK)
	return bpf_ktime_get_coarse_ns();
#else
	return clock_now();
#endif
}

#ifdef HALB_BENCH_V4_KEY
struct flow_key_v4 {
	__u32 src;
	__u32 dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow_key_v4);
	__type(value, struct flow_value);
	__uint(max_entries, HALB_MAX_FLOWS);
} flows_v4 SEC(".maps");

#define BENCH_FLOWS (&flows_v4)
#define BENCH_KEY(pkt)                                                                 \
	(&(struct flow_key_v4){(pkt)->key.src[0], (pkt)->key.dst[0], (pkt)->key.sport, \
			       (pkt)->key.dport, (pkt)->key.proto})
#elif defined(HALB_BENCH_NO_COMMON_LRU)
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct flow_key);
	__type(value, struct flow_value);
	__uint(max_entries, HALB_MAX_FLOWS);
} flows_nc SEC(".maps");

#define BENCH_FLOWS (&flows_nc)
#define BENCH_KEY(pkt) (&(pkt)->key)
#else
#define BENCH_FLOWS (&flows)
#define BENCH_KEY(pkt) (&(pkt)->key)
#endif

/* ring_backend (balancer.h) recording into this build's flows map. */
static __always_inline const struct backend_info *bench_record(struct packet *pkt,
								const struct service_info *svc,
								const struct lb_config *cfg,
								__u64 frame_len, __u32 hash,
								__u64 now, __u32 *backend_id)
{
#if defined(HALB_BENCH_NO_COMMON_LRU) || defined(HALB_BENCH_V4_KEY)
	const struct backend_info *be;
	struct flow_value nv = {};

	be = slot_backend(svc, hash, &nv.backend_id);
	if (!be)
		return 0;
	nv.flags = flow_flags(0, pkt->tcp_flags);
	nv.last_seen = now;
	if (bpf_map_update_elem(BENCH_FLOWS, BENCH_KEY(pkt), &nv, BPF_ANY) == 0)
		flow_event(pkt, &nv, cfg, frame_len);
	*backend_id = nv.backend_id;
	return be;
#else
	return ring_backend(pkt, svc, cfg, frame_len, hash, now, backend_id);
#endif
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
	__u32 zero = 0, backend_id = 0, hash = 0;
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
	if (!vip_filter_pass(&pkt))
		return XDP_PASS;
	STAGE(1);
#ifdef HALB_BENCH_SERVICE_LOOKUP
	if (!service_of(&pkt))
		return XDP_PASS;
#endif
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return XDP_DROP;
	now = bench_now();
	fv = bpf_map_lookup_elem(BENCH_FLOWS, BENCH_KEY(&pkt));
	if (fv) {
#ifndef HALB_BENCH_NO_EXPIRY
		if (!flow_expired(fv, pkt.key.proto, cfg, now)) {
#else
		{
#endif
			backend_id = fv->backend_id;
			be = live_backend(backend_id);
		}
#ifndef HALB_BENCH_NO_EXPIRY
		else {
			count(&stats_global, STAT_FLOW_EXPIRED, frame_len);
		}
#endif
	}
	STAGE(2);
#ifdef HALB_BENCH_ALWAYS_MISS
	be = 0;
#endif
	if (!be) {
		svc = service_of(&pkt);
		if (!svc)
			return XDP_PASS;
	}
#ifndef HALB_BENCH_NO_DEADLINE
	if (deadline_passed(cfg, now)) {
		count(&stats_global, STAT_DEADLINE_DROP, frame_len);
		return XDP_DROP;
	}
#endif
	if (!be) {
		hash = flow_hash(&pkt.key);
		be = bench_record(&pkt, svc, cfg, frame_len, hash, now, &backend_id);
		if (!be) {
			count(&stats_global, STAT_NO_BACKEND, frame_len);
			return XDP_DROP;
		}
	} else if (fv) {
#if defined(HALB_BENCH_ALWAYS_TOUCH)
		fv->flags = flow_flags(fv->flags, pkt.tcp_flags);
		fv->last_seen = now;
#elif !defined(HALB_BENCH_NO_TOUCH) && !defined(HALB_BENCH_NO_EXPIRY)
		flow_touch(fv, pkt.tcp_flags, now);
#endif
	}
	STAGE(3);
#ifndef HALB_BENCH_NO_COUNTERS
#ifndef HALB_BENCH_BACKEND_COUNTER_ONLY
	count(&stats_service, be->service, frame_len);
#endif
	count(&stats_backend, backend_id, frame_len);
#endif
	STAGE(4);

	if (be->flags & BACKEND_F_TUNNEL) {
		if (!hash)
			hash = flow_hash(&pkt.key);
		verdict = encap_tunnel(ctx, &pkt, be, cfg, hash);
		if (verdict != XDP_TX)
			count(&stats_global, STAT_ENCAP_FAIL, frame_len);
		return verdict;
	}
	return forward_dsr(data, data_end, be, cfg);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
