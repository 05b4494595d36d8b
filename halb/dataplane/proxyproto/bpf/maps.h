#ifndef HALB_PP_MAPS_H
#define HALB_PP_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "structs.h"

/* Written by user space when a full-NAT flow of a PROXY service is created (and by the
 * sync client on a standby), deleted with the flow. A hash, not an LRU: an evicted
 * entry would make the next segment unshifted and break the connection silently. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HALB_PP_MAX_FLOWS);
	__type(key, struct pp_key);
	__type(value, struct pp_flow);
} pp_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PP_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} pp_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pp_config);
} pp_config SEC(".maps");

/* Scratch for moving a first segment's payload behind the inserted header. */
#define PP_CHUNK 256
/* payloads up to HALB_PP_MOVE_CHUNKS * 256 bytes (16 KiB) move; larger ones take PP_TRIM */
#ifndef HALB_PP_MOVE_CHUNKS
#define HALB_PP_MOVE_CHUNKS 64
#endif
#define PP_MOVE_CHUNKS HALB_PP_MOVE_CHUNKS
struct pp_chunk {
	__u8 b[PP_CHUNK];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pp_chunk);
} pp_scratch SEC(".maps");

static __always_inline void pp_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&pp_stats, &idx);

	if (v)
		*v += 1;
}

#endif
