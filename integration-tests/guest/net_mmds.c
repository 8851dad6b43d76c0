/*
 * A minimal MMDS client on net device 0 (CPL3): ARP for the service's
 * address, then one TCP connection per HTTP exchange (SYN, ACK + request,
 * ACK every data segment, FIN), with IPv4 and TCP checksums computed here.
 *
 * mmds=1: the exchanges below, each printed as
 *   guest: mmds <n> status=<code> body="<first 96 bytes>"
 * mmds_flood=N: first N SYNs from distinct ports, never completed (the
 * service must stay bounded and keep answering).
 *
 *   0 GET /latest/meta-data/ami-id           (no token)
 *   1 PUT /latest/api/token, TTL 60          (the body is the token)
 *   2 GET /latest/meta-data/ami-id, token, Accept: application/json
 *   3 GET /latest/meta-data/, token          (IMDS listing)
 *   4 garbage request line                   (400)
 *   5 GET /latest/meta-data/ami-id, forged token
 *   6 GET /latest/meta-data/nonexistent, token         (404)
 *   7 GET /latest/meta-data/placement, token, JSON     (an object as JSON)
 *   8 GET /latest/meta-data/placement, token           (an object as a listing)
 *   9 PUT /latest/api/token, TTL 0                     (400)
 *  10 PUT /latest/api/token, TTL 60, X-Forwarded-For   (400)
 *  11 PUT /latest/api/token without a TTL              (400)
 *  12 POST /latest/meta-data/, token                   (405)
 *  13 PUT /latest/meta-data/ami-id, TTL 60             (405 or 400)
 */
#include "virtio.h"

#define ETH_ARP 0x0806
#define ETH_IP  0x0800
static const u8 GUEST_IP[4] = { 169, 254, 0, 2 };
static const u8 MMDS_IP[4] = { 169, 254, 169, 254 };

static u8 my_mac[6], mmds_mac[6];
static u8 frame[600], rx[2048];
static char resp[4096];

static void put16(u8 *p, u32 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { put16(p, v >> 16); put16(p + 2, v); }
static u32 get16(const u8 *p) { return (u32)p[0] << 8 | p[1]; }
static u32 get32(const u8 *p) { return get16(p) << 16 | get16(p + 2); }

static u32 csum_add(u32 sum, const u8 *p, u32 n)
{
	for (u32 i = 0; i + 1 < n; i += 2)
		sum += get16(p + i);
	if (n & 1)
		sum += (u32)p[n - 1] << 8;
	return sum;
}

static u32 csum_fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

static int arp_resolve(void)
{
	memset(frame, 0, 42);
	memset(frame, 0xff, 6);
	memcpy(frame + 6, my_mac, 6);
	put16(frame + 12, ETH_ARP);
	u8 *a = frame + 14;
	put16(a, 1);            /* Ethernet */
	put16(a + 2, ETH_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, 1);        /* request */
	memcpy(a + 8, my_mac, 6);
	memcpy(a + 14, GUEST_IP, 4);
	memcpy(a + 24, MMDS_IP, 4);
	if (!net_send(0, frame, 42))
		return 0;
	for (int tries = 0; tries < 50; tries++) {
		int n = net_recv(0, rx, sizeof(rx), 200);
		if (n < 42)
			continue;
		if (get16(rx + 12) == ETH_ARP && get16(rx + 20) == 2 && !memcmp(rx + 28, MMDS_IP, 4)) {
			memcpy(mmds_mac, rx + 22, 6);
			gprintf("guest: mmds arp mac=%02x:%02x:%02x:%02x:%02x:%02x\n", mmds_mac[0],
				mmds_mac[1], mmds_mac[2], mmds_mac[3], mmds_mac[4], mmds_mac[5]);
			return 1;
		}
	}
	gprintf("guest: mmds arp no answer\n");
	return 0;
}

/* One TCP segment to the service. */
static int tcp_send(u32 sport, u32 seq, u32 ack, u32 flags, const char *data, u32 len)
{
	u32 ip_len = 20 + 20 + len;
	memset(frame, 0, 14 + ip_len);
	memcpy(frame, mmds_mac, 6);
	memcpy(frame + 6, my_mac, 6);
	put16(frame + 12, ETH_IP);
	u8 *ip = frame + 14, *t = ip + 20;
	ip[0] = 0x45;
	put16(ip + 2, ip_len);
	ip[8] = 64;
	ip[9] = 6;
	memcpy(ip + 12, GUEST_IP, 4);
	memcpy(ip + 16, MMDS_IP, 4);
	put16(ip + 10, csum_fold(csum_add(0, ip, 20)));
	put16(t, sport);
	put16(t + 2, 80);
	put32(t + 4, seq);
	put32(t + 8, ack);
	t[12] = 5 << 4;
	t[13] = (u8)flags;
	put16(t + 14, 8192);
	memcpy(t + 20, data, len);
	u8 pseudo[12];
	memcpy(pseudo, GUEST_IP, 4);
	memcpy(pseudo + 4, MMDS_IP, 4);
	pseudo[8] = 0;
	pseudo[9] = 6;
	put16(pseudo + 10, 20 + len);
	put16(t + 16, csum_fold(csum_add(csum_add(0, pseudo, 12), t, 20 + len)));
	return net_send(0, frame, 14 + ip_len);
}

/* The next TCP segment from the service to `sport`: its flags, seq and payload. */
static int tcp_recv(u32 sport, u32 *flags, u32 *seq, const u8 **data, u32 *len, u64 ms)
{
	u64 end = vt_deadline(ms);
	while (!vt_expired(end)) {
		int n = net_recv(0, rx, sizeof(rx), 100);
		if (n < 54 || get16(rx + 12) != ETH_IP || rx[23] != 6 || memcmp(rx + 26, MMDS_IP, 4))
			continue;
		u8 *ip = rx + 14;
		u32 ihl = (u32)(ip[0] & 0xf) * 4, tot = get16(ip + 2);
		u8 *t = ip + ihl;
		if (get16(t + 2) != sport)
			continue;
		u32 doff = (u32)(t[12] >> 4) * 4;
		*flags = t[13];
		*seq = get32(t + 4);
		*data = t + doff;
		*len = tot - ihl - doff;
		return 1;
	}
	return 0;
}

#define SYN 0x02
#define ACK 0x10
#define PSH 0x08
#define FIN 0x01
#define RST 0x04

/* One request on a new connection; the reply (head and body) in resp. */
static int exchange(u32 sport, const char *req)
{
	u32 iss = sport * 1000, flags, seq, len;
	const u8 *data;
	if (!tcp_send(sport, iss, 0, SYN, 0, 0))
		return 0;
	if (!tcp_recv(sport, &flags, &seq, &data, &len, 2000) || (flags & (SYN | ACK)) != (SYN | ACK)) {
		gprintf("guest: mmds port %u no syn-ack\n", sport);
		return 0;
	}
	u32 rcv = seq + 1, snd = iss + 1, got = 0, rlen = (u32)strlen(req);
	if (!tcp_send(sport, snd, rcv, ACK | PSH, req, rlen))
		return 0;
	snd += rlen;
	u32 want = 0xffffffff;
	while (got < want) {
		if (!tcp_recv(sport, &flags, &seq, &data, &len, 2000)) {
			gprintf("guest: mmds port %u reply timed out after %u bytes\n", sport, got);
			return 0;
		}
		if (flags & RST)
			return 0;
		if (len && seq == rcv) {
			u32 room = sizeof(resp) - 1 - got;
			memcpy(resp + got, data, len < room ? len : room);
			got += len < room ? len : room;
			rcv += len;
			resp[got] = 0;
			tcp_send(sport, snd, rcv, ACK, 0, 0);
		}
		if (flags & FIN)
			break;
		/* Content-Length tells when the reply is whole (the service keeps the connection). */
		for (u32 i = 0; i + 3 < got; i++)
			if (!memcmp(resp + i, "\r\n\r\n", 4)) {
				u32 cl = 0;
				for (u32 j = 0; j + 16 < i; j++)
					if (!memcmp(resp + j, "Content-Length: ", 16)) {
						for (u32 k = j + 16; resp[k] >= '0' && resp[k] <= '9'; k++)
							cl = cl * 10 + (u32)(resp[k] - '0');
						break;
					}
				want = i + 4 + cl;
				break;
			}
	}
	tcp_send(sport, snd, rcv, FIN | ACK, 0, 0);
	if (tcp_recv(sport, &flags, &seq, &data, &len, 500) && (flags & FIN))
		tcp_send(sport, snd + 1, seq + len + 1, ACK, 0, 0);
	return 1;
}

/* Prints one exchange; returns its status (0: none). */
static u32 report(u32 n)
{
	u32 status = 0;
	if (!memcmp(resp, "HTTP/1.1 ", 9) || !memcmp(resp, "HTTP/1.0 ", 9))
		for (u32 i = 9; resp[i] >= '0' && resp[i] <= '9'; i++)
			status = status * 10 + (u32)(resp[i] - '0');
	char *body = resp;
	for (char *p = resp; *p; p++)
		if (p[0] == '\r' && p[1] == '\n' && p[2] == '\r' && p[3] == '\n') {
			body = p + 4;
			break;
		}
	char shown[97];
	u32 i = 0;
	for (; i < 96 && body[i]; i++)
		shown[i] = body[i] == '\n' ? '|' : body[i];
	shown[i] = 0;
	gprintf("guest: mmds %u status=%u body=\"%s\"\n", n, status, shown);
	return status;
}

static int has_token_slot(const char *r)
{
	for (; *r; r++)
		if (r[0] == '%' && r[1] == 's')
			return 1;
	return 0;
}

int mmds_workload(void)
{
	char token[128] = { 0 }, req[512];
	if (!net_mac(0, my_mac) || !net_post_rx(0) || !arp_resolve())
		return 0;
	for (u64 i = 0; i < g_vparams.mmds_flood; i++)
		if (!tcp_send(20000 + (u32)(i % 20000), 7, 0, SYN, 0, 0))
			return 0;
	if (g_vparams.mmds_flood)
		gprintf("guest: mmds flood sent=%lu\n", g_vparams.mmds_flood);
	static const char *reqs[] = {
		"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
		"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
		"GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: %s\r\nAccept: application/json\r\n\r\n",
		"GET /latest/meta-data/ HTTP/1.1\r\nX-aws-ec2-metadata-token: %s\r\n\r\n",
		"\x01\x02 / HTTP/1.1\r\n\r\n",
		"GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: 0123456789abcdef0123456789abcdef0123456789abcdef\r\n\r\n",
		"GET /latest/meta-data/nonexistent HTTP/1.1\r\nX-metadata-token: %s\r\n\r\n",
		"GET /latest/meta-data/placement HTTP/1.1\r\nX-metadata-token: %s\r\nAccept: application/json\r\n\r\n",
		"GET /latest/meta-data/placement HTTP/1.1\r\nX-metadata-token: %s\r\n\r\n",
		"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n",
		"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
		"PUT /latest/api/token HTTP/1.1\r\n\r\n",
		"POST /latest/meta-data/ HTTP/1.1\r\nX-metadata-token: %s\r\n\r\n",
		"PUT /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
	};
	for (u32 n = 0; n < sizeof(reqs) / sizeof(reqs[0]); n++) {
		const char *r = reqs[n];
		if (has_token_slot(r)) {
			u32 o = 0;
			for (const char *p = r; *p && o + 1 < sizeof(req); p++) {
				if (p[0] == '%' && p[1] == 's') {
					for (const char *t = token; *t && o + 1 < sizeof(req); t++)
						req[o++] = *t;
					p++;
				} else {
					req[o++] = *p;
				}
			}
			req[o] = 0;
			r = req;
		}
		resp[0] = 0;
		if (!exchange(40000 + n, r))
			return 0;
		u32 status = report(n);
		if (n == 1 && status == 200) {
			char *body = resp;
			for (char *p = resp; *p; p++)
				if (p[0] == '\r' && p[1] == '\n' && p[2] == '\r' && p[3] == '\n') {
					body = p + 4;
					break;
				}
			u32 i = 0;
			for (; i + 1 < sizeof(token) && body[i] > ' '; i++)
				token[i] = body[i];
			token[i] = 0;
		}
	}
	gprintf("guest: mmds done\n");
	return 1;
}
