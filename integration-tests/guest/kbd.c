/*
 * The i8042 keyboard, polled at CPL0 (port I/O): waits for the Ctrl-Alt-Del a VMM sends
 * (Firecracker's SendCtrlAltDel: set-2 make codes Ctrl 0x14, Alt 0x11, Del 0xe0 0x71), as a
 * Linux guest with reboot=k would before resetting the machine.
 */
#include "guest.h"

#define I8042_DATA      0x60
#define I8042_STATUS    0x64
#define STATUS_OBF      0x01            /* output buffer full: a byte waits at 0x60 */

int kbd_wait_ctrl_alt_del(u64 timeout_ms)
{
	static const u8 seq[] = { 0x14, 0x11, 0xe0, 0x71 };
	u32 matched = 0;
	u64 waited_ms = 0;

	gprintf("guest: kbd waiting for ctrl-alt-del\n");
	while (matched < sizeof(seq)) {
		if (!(inb(I8042_STATUS) & STATUS_OBF)) {
			/* Each poll is a VM exit: poll once a millisecond, not in a tight loop. */
			if (waited_ms++ >= timeout_ms) {
				gprintf("guest: kbd no ctrl-alt-del within %lu ms\n", timeout_ms);
				return 0;
			}
			delay_us(1000);
			continue;
		}
		u8 b = inb(I8042_DATA);
		gprintf("guest: kbd scancode 0x%x\n", b);
		matched = b == seq[matched] ? matched + 1 : (b == seq[0]);
	}
	gprintf("guest: ctrl-alt-del\n");
	return 1;
}
