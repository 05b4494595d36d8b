// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
/* halb XDP balancer: VIP:port/proto match, LRU flow table, Maglev ring, dsr / tunnel.
 *
 * Per packet: parse -> VIP filter on the destination's last byte (no VIP ends in it:
 * XDP_PASS) -> flow table (hit with a live backend: the backend entry names its
 * service, so the services hash is not read; a flow idle past its timeout is a miss,
 * expiry.h) -> else service lookup (miss: XDP_PASS) and ring slot (hash % ring_size),
 * recording the flow -> dead-man deadline -> counters -> rewrite and XDP_TX. IPv4
 * fragments for a VIP drop; ICMP errors about a VIP flow go to its backend (icmp.h);
 * other frames go to the ARP / ND fence (fence.h) and otherwise pass.
 *
 * Flow hit first: one hash lookup per packet in the steady state instead of two (each
 * costs 12-17 ns here, as much as the rest of the path). Traffic for other addresses
 * stops at the filter; only one whose last byte matches a VIP's pays a flow-table
 * miss before the services lookup. The steps are in balancer.h; bench/bpf/ composes
 * them otherwise to measure each. */
#include "balancer.h"
#include "clock.h"

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
	/* An array entry (the verifier inlines the lookup); the clock is read once for the
	 * deadline, expiry and the flow's stamp. */
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return XDP_DROP;
	now = clock_now();
	fv = bpf_map_lookup_elem(&flows, &pkt.key);
	if (fv) {
		if (!flow_expired(fv, pkt.key.proto, cfg, now)) {
			backend_id = fv->backend_id;
			be = live_backend(backend_id);
		} else {
			count(&stats_global, STAT_FLOW_EXPIRED, frame_len);
		}
	}
	if (!be) {
		svc = service_of(&pkt);
		if (!svc)
			return XDP_PASS;
	}
	/* VIP traffic only; checked before a flow is recorded, so a fenced node learns
	 * nothing new. */
	if (deadline_passed(cfg, now)) {
		count(&stats_global, STAT_DEADLINE_DROP, frame_len);
		return XDP_DROP;
	}
	if (!be) {
		hash = flow_hash(&pkt.key);
		be = ring_backend(&pkt, svc, cfg, frame_len, hash, now, &backend_id);
		if (!be) {
			count(&stats_global, STAT_NO_BACKEND, frame_len);
			return XDP_DROP;
		}
	} else if (fv) { /* always, on a hit; the verifier cannot tell */
		flow_touch(fv, pkt.tcp_flags, now);
	}
	count(&stats_service, be->service, frame_len);
	count(&stats_backend, backend_id, frame_len);

	if (be->flags & BACKEND_F_TUNNEL) {
		if (!hash) /* a flow hit: the hash is only needed for the flow label */
			hash = flow_hash(&pkt.key);
		verdict = encap_tunnel(ctx, &pkt, be, cfg, hash);
		if (verdict != XDP_TX)
			count(&stats_global, STAT_ENCAP_FAIL, frame_len);
		return verdict;
	}
	return forward_dsr(data, data_end, be, cfg);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
