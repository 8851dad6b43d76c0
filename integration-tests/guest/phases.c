/*
 * Workload phases for the predictor's end-to-end tests, after the standard
 * CPU, memory and virtio phases:
 *
 *   port_hammer=N   N byte writes to PORT_HAMMER (no device there), at CPL0
 *                   so each is one quick PIO exit: the "guest probes an
 *                   unknown port" anomaly.
 *
 * Prints "guest: port_hammer start n=<N>" before and
 * "guest: port_hammer done" after.
 */
#include "guest.h"

#define PORT_HAMMER 0x0511

static u64 hammer_count;

/* Returns 0 = ok, 1 = unknown key, 2 = bad value (as cmdline.c's apply). */
int phases_param(const char *k, size_t kn, const char *v, size_t vn)
{
	if (kn == 11 && !memcmp(k, "port_hammer", 11))
		return parse_u64(v, vn, &hammer_count) ? 0 : 2;
	return 1;
}

void phases_run(void)                   /* CPL0 */
{
	if (!hammer_count)
		return;
	gprintf("guest: port_hammer start n=%lu\n", hammer_count);
	for (u64 i = 0; i < hammer_count; i++)
		outb(PORT_HAMMER, (u8)i);
	gprintf("guest: port_hammer done\n");
}
