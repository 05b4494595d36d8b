// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
/* Baseline for bench/xdp_cost.py: the cheapest program that forwards (XDP_TX). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int halb_minimal(struct xdp_md *ctx)
{
	return XDP_TX;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
