// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
/* halb XDP balancer: VIP:port/proto match, LRU flow table, Maglev ring, dsr / tunnel.
 *
 * Per packet: parse -> service lookup (miss: XDP_PASS) -> dead-man deadline ->
 * flow table (hit with a live backend: reuse) or ring slot (hash % ring_size) and
 * record the flow -> counters -> rewrite and XDP_TX. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "constants.h"
#include "structs.h"
#include "maps.h"
#include "parse.h"
#include "hash.h"
#include "encap.h"

static __always_inline void count(void *map, __u32 index, __u64 bytes)
{
	struct counter *c = bpf_map_lookup_elem(map, &index);

	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

static __always_inline const struct backend_info *pick_backend(struct packet *pkt,
								const struct service_info *svc,
								__u32 *hash, __u32 *backend_id)
{
	struct flow_value *fv = bpf_map_lookup_elem(&flows, &pkt->key);
	const struct backend_info *be;
	struct flow_value nv = {};
	__u32 slot, *id;

	if (fv) {
		__u32 fid = fv->backend_id;

		be = bpf_map_lookup_elem(&backends, &fid);
		/* A flow to a removed backend falls through to the ring. */
		if (be && (be->flags & BACKEND_F_VALID)) {
			*backend_id = fid;
			return be;
		}
	}
	/* The hash is only needed here (and for a tunnel's flow label): not on a hit. */
	*hash = flow_hash(&pkt->key);
	if (svc->ring_size == 0 || svc->ring_size > HALB_RING_STRIDE)
		return 0;
	slot = svc->index * HALB_RING_STRIDE + *hash % svc->ring_size;
	id = bpf_map_lookup_elem(&ring, &slot);
	if (!id)
		return 0;
	nv.backend_id = *id;
	be = bpf_map_lookup_elem(&backends, &nv.backend_id);
	if (!be || !(be->flags & BACKEND_F_VALID))
		return 0;
	bpf_map_update_elem(&flows, &pkt->key, &nv, BPF_ANY);
	*backend_id = nv.backend_id;
	return be;
}

SEC("xdp")
int halb_balancer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 frame_len = data_end - data;
	const struct service_info *svc;
	const struct backend_info *be;
	struct packet pkt = {};
	struct vip_key vk = {};
	struct lb_config *cfg;
	__u32 zero = 0, backend_id = 0, hash = 0;

	if (parse_packet(data, data_end, &pkt))
		return XDP_PASS;

	__builtin_memcpy(vk.addr, pkt.key.dst, sizeof(vk.addr));
	vk.port = pkt.key.dport;
	vk.proto = pkt.key.proto;
	vk.family = pkt.key.family;
	svc = bpf_map_lookup_elem(&services, &vk);
	if (!svc)
		return XDP_PASS;

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return XDP_DROP;
	if (cfg->deadline_ns && bpf_ktime_get_ns() > cfg->deadline_ns) {
		count(&stats_global, STAT_DEADLINE_DROP, frame_len);
		return XDP_DROP;
	}

	be = pick_backend(&pkt, svc, &hash, &backend_id);
	if (!be) {
		count(&stats_global, STAT_NO_BACKEND, frame_len);
		return XDP_DROP;
	}
	count(&stats_service, svc->index, frame_len);
	count(&stats_backend, backend_id, frame_len);

	if (svc->flags & SVC_F_TUNNEL) {
		int verdict;

		if (!hash)
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
