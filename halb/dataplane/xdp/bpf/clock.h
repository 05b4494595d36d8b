/* halb_clock: the program's clock (jiffies) beside CLOCK_MONOTONIC_COARSE, for user
 * space (halb/dataplane/xdp/clock.py), in every object that reads jiffies (the
 * balancer, bench/bpf/variants.bpf.c). Included once, by the entry file. */
#ifndef HALB_CLOCK_H
#define HALB_CLOCK_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* The program's clock beside CLOCK_MONOTONIC_COARSE, for the adapter (run with
 * BPF_PROG_TEST_RUN, never attached): the frame's first 24 bytes become coarse ns,
 * jiffies, coarse ns; equal coarse readings bracket the jiffies read within one tick. */
SEC("xdp")
int halb_clock(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 *out = data;

	if ((void *)(out + 3) > data_end)
		return XDP_ABORTED;
	out[0] = bpf_ktime_get_coarse_ns();
	out[1] = bpf_jiffies64();
	out[2] = bpf_ktime_get_coarse_ns();
	return XDP_PASS;
}

#endif
