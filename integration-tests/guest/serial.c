/*
 * COM1 (16550 at 0x3f8), polled: output, and input for exit=serial.
 *
 * Bytes go straight to THR without polling LSR: every VMM we target
 * (prescient's vm-superio serial, QEMU) accepts them synchronously, and each
 * extra inb would be one more ~8 us PIO exit. Whole lines are written under
 * one spinlock so output from several vCPUs never interleaves.
 *
 * At CPL3 a line goes through a SYS_WRITE call: PVM-style software KVM
 * does not honour IOPL=3, so a user-mode `out` would #GP (and be emulated
 * one byte at a time); one syscall per line is far cheaper there.
 */
#include "guest.h"

#define COM1 0x3f8
#define LSR_DATA_READY 0x01

static spinlock_t console_lock;

void serial_init(void)
{
	outb(COM1 + 1, 0x00);   /* IER: no interrupts */
	outb(COM1 + 3, 0x80);   /* LCR: DLAB */
	outb(COM1 + 0, 0x01);   /* DLL: 115200 */
	outb(COM1 + 1, 0x00);   /* DLM */
	outb(COM1 + 3, 0x03);   /* LCR: 8N1 */
}

static void put(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		outb(COM1, (u8)s[i]);
}

void serial_write_line(const char *s, size_t n)
{
	if (cpl() == 3) {
		syscall3(SYS_WRITE, (u64)s, n, 0);
		return;
	}
	spin_lock(&console_lock);
	put(s, n);
	spin_unlock(&console_lock);
}

/* Exception path: another CPU (or this one, mid-line) may hold the lock. */
void serial_panic_write(const char *s, size_t n)
{
	for (u32 i = 0; i < 100000 && !spin_trylock(&console_lock); i++)
		cpu_relax();
	put(s, n);
	spin_unlock(&console_lock);
}

/*
 * exit=serial (CPL0, port I/O): prints every byte the console receives as
 * "guest: serial byte 0x.." until a line ends (CR or LF), then the line
 * itself; polls the line status once a millisecond while nothing waits.
 * Returns 0 if no line ended within timeout_ms of the last byte.
 */
int serial_echo_line(u64 timeout_ms)
{
	char line[128];
	size_t n = 0;
	u64 waited_ms = 0;

	gprintf("guest: serial waiting for input\n");
	for (;;) {
		if (!(inb(COM1 + 5) & LSR_DATA_READY)) {
			if (waited_ms++ >= timeout_ms) {
				gprintf("guest: serial no line within %lu ms\n", timeout_ms);
				return 0;
			}
			delay_us(1000);
			continue;
		}
		waited_ms = 0;
		u8 b = inb(COM1);
		gprintf("guest: serial byte 0x%x\n", b);
		if (b == '\r' || b == '\n')
			break;
		if (n < sizeof(line) - 1)
			line[n++] = (char)b;
	}
	line[n] = 0;
	gprintf("guest: serial line \"%s\"\n", line);
	return 1;
}
