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

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow_key);
	__type(value, struct flow_value);
	__uint(max_entries, HALB_MAX_FLOWS);
} flows SEC(".maps");

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

#endif
