/* Ones' complement sums, kept in memory byte order (values as loaded from the packet),
 * so they combine with bpf_csum_diff's and the checksum field without byte swaps. */
#ifndef HALB_PP_CSUM_H
#define HALB_PP_CSUM_H

#include <linux/types.h>

/* Hide what clang knows of x, so the bounds checked right after this stay in the code
 * the verifier sees (clang otherwise drops a lower bound it proved earlier, and the
 * verifier, which lost it through a stack spill, rejects a possibly zero-sized access). */
#define PP_OPAQUE(x) asm volatile("" : "+r"(x))

static __always_inline __u32 pp_csum_add(__u32 a, __u32 b)
{
	__u32 s = a + b;

	return s + (s < a);
}

static __always_inline __u16 pp_csum_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

static __always_inline __u16 pp_swab16(__u16 v)
{
	return (__u16)((v << 8) | (v >> 8));
}

#endif
