// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
/* The floor of any program that must look its flow up (bench/xdp_cost.py only): the
 * minimal XDP_TX program plus one lookup in the production flows map (same LRU hash,
 * same 40-byte key), the key read straight from the frame with no parsing at all. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"
#include "structs.h"

SEC("xdp")
int halb_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct flow_key key;

	if (data + 14 + sizeof(key) > data_end)
		return XDP_PASS;
	__builtin_memcpy(&key, data + 14, sizeof(key));
	return bpf_map_lookup_elem(&flows, &key) ? XDP_TX : XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
