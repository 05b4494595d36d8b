/* Maps. The loader finds them by these names; sizes come from constants.h. */
#ifndef HALB_MAPS_H
#define HALB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "constants.h"
#include "structs.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct vip_key);
	__type(value, struct service_info);
	__uint(max_entries, HALB_MAX_SERVICES);
} services SEC(".maps");

/* One array for every service's Maglev table: slot s of service i is at
 * i * HALB_RING_STRIDE + s; the value is a backend id. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, HALB_MAX_SERVICES * HALB_RING_STRIDE);
} ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct backend_info);
	__uint(max_entries, HALB_MAX_BACKENDS);
} backends SEC(".maps");

/* VIP address -> number of services on it; read only past the deadline (ARP/NS fence).
 * Twice the services: an apply adds the new addresses before it drops the old. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct vip_addr);
	__type(value, __u32);
	__uint(max_entries, 2 * HALB_MAX_SERVICES);
} vip_addrs SEC(".maps");

/* Last byte of a VIP address -> how many VIP addresses end in it. A packet whose
 * destination ends in a byte no VIP ends in is not for a VIP: it passes after one
 * array read (inlined) instead of two hash lookups. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 256);
} vip_filter SEC(".maps");


struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow_key);
	__type(value, struct flow_value);
	__uint(max_entries, HALB_MAX_FLOWS);
} flows SEC(".maps");

/* New flows (struct flow_event), written only while lb_config.flags has
 * CFG_F_FLOW_EVENTS: the active's flow source learns of them within milliseconds
 * instead of at its next scan of `flows`. A full ring counts STAT_EVENT_LOST. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, HALB_FLOW_EVENTS_BYTES);
} flow_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, HALB_MAX_SERVICES);
} stats_service SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, HALB_MAX_BACKENDS);
} stats_backend SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, STAT_MAX);
} stats_global SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_config);
	__uint(max_entries, 1);
} config SEC(".maps");

/* One packet of `bytes` on a per-CPU counter (stats_*). */
static __always_inline void count(void *map, __u32 index, __u64 bytes)
{
	struct counter *c = bpf_map_lookup_elem(map, &index);

	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

#endif
