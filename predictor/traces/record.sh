#!/usr/bin/env bash
# Re-records the real-program corpus: every program below runs under `prescient trace record`
# (100 ms windows) and lands in train/ or test/ by its FAMILY, a split fixed here:
#
#   train: build, compression, text, storage, server
#   test:  database, runtime, media
#
# so the test split holds only programs of families no model or setting was ever fitted to.
# Usage: predictor/traces/record.sh [FILTER]   (FILTER: only traces whose name contains it)
# Needs root (unshare for the servers' network namespaces, setpriv for postgres) and the Debian
# packages in PACKAGES; PRESCIENT names the binary (default: target/release/prescient, else
# target/debug/prescient). Runs take ~30 min; the machine's load goes into each trace's header.
# The programs run at nice NICE (default -10) in a session (scheduler autogroup) of their own
# with that nice: on a machine shared with builds, a program at the builds' priority gets a
# share of the CPU the builds set, and its trace would measure the scheduler instead of the
# program's own demand.
set -euo pipefail
cd "$(dirname "$0")"
TRACES=$PWD
FILTER=${1:-}
NICE=${NICE:--10}
PACKAGES="gcc g++ make gzip bzip2 xz-utils zstd brotli p7zip-full gawk jq fio stress-ng sysbench
nginx-light lighttpd apache2-utils wrk memcached libmemcached-tools sqlite3 postgresql redis-server
redis-tools python3 nodejs ruby default-jre-headless lua5.4 guile-3.0 sox imagemagick ghostscript
iproute2 util-linux"
missing=$(for p in $PACKAGES; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"; done)
if [ -n "$missing" ]; then
  echo "installing:" $missing
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
ROOT=$(cd ../.. && pwd)
PRESCIENT=${PRESCIENT:-}
if [ -z "$PRESCIENT" ]; then
  for p in "$ROOT/target/release/prescient" "$ROOT/target/debug/prescient"; do
    [ -x "$p" ] && PRESCIENT=$p && break
  done
fi
[ -x "${PRESCIENT:-}" ] || { echo "build prescient first (cargo build --release -p vmm)" >&2; exit 1; }

W=$(mktemp -d /tmp/prescient-corpus.XXXXXX)
chmod 755 "$W"
trap 'rm -rf "$W"' EXIT
cd "$W"

split_of() {
  case "$1" in
    build|compression|text|storage|server) echo train ;;
    database|runtime|media) echo test ;;
    *) echo "unknown family $1" >&2; exit 1 ;;
  esac
}

wanted() { [ -z "$FILTER" ] || [[ "$1" == *"$FILTER"* ]]; }

# prio CMD...: runs CMD in a new session whose autogroup and own nice are $NICE (with
# autogroups, nice alone only ranks a process within its session).
prio() {
  setsid --wait sh -c 'echo "$0" > /proc/self/autogroup 2>/dev/null; exec nice -n "$0" "$@"' "$NICE" "$@"
}

# rec FAMILY NAME -- CMD...: records CMD as FAMILY-NAME.
rec() {
  local family=$1 name=$2; shift 3
  local full="$family-$name"
  wanted "$full" || return 0
  local dir="$TRACES/$(split_of "$family")"
  mkdir -p "$dir"
  prio "$PRESCIENT" trace record --name "$full" --out "$dir/$full.jsonl" -- "$@"
}

# serve FAMILY NAME PORT 'SERVER CMD' 'LOAD CMD': records the server alone, in a network namespace
# of its own (so its traffic is attributable); the load generator joins that namespace from
# outside the recorded tree, like a client outside a VM.
serve() {
  local family=$1 name=$2 port=$3 server=$4 load=$5
  local full="$family-$name"
  wanted "$full" || return 0
  local dir="$TRACES/$(split_of "$family")"
  mkdir -p "$dir"
  rm -f "$W/pid"
  prio "$PRESCIENT" trace record --name "$full" --out "$dir/$full.jsonl" --pid-file "$W/pid" -- \
    unshare -n sh -c "ip link set lo up && exec $server >>$W/server.log 2>&1" &
  local rec_pid=$!
  while [ ! -s "$W/pid" ]; do sleep 0.05; done
  local pid; pid=$(cat "$W/pid")
  for _ in $(seq 100); do
    nsenter -t "$pid" -n bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null && break
    sleep 0.1
  done
  prio nsenter -t "$pid" -n sh -c "$load" >/dev/null 2>&1 || echo "$full: load generator failed" >&2
  sleep 1
  kill -TERM "$pid" 2>/dev/null || true
  wait "$rec_pid"
}

# ---- inputs ---------------------------------------------------------------------------------
python3 - <<'PY'
import random
random.seed(20)
words = [''.join(random.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(random.randint(2, 9))) for _ in range(5000)]
for name, lines in (('text-s', 300_000), ('text-l', 1_500_000)):
    with open(name, 'w') as f:
        for i in range(lines):
            f.write(' '.join(random.choice(words) for _ in range(random.randint(3, 14))) + f' {random.randint(0, 99999)}\n')
with open('events.jsonl', 'w') as f:
    for i in range(400_000):
        f.write('{"id":%d,"user":"%s","ms":%d,"tags":["%s","%s"]}\n' % (i, random.choice(words), random.randint(1, 5000), random.choice(words), random.choice(words)))
def c_file(path, n):
    with open(path, 'w') as f:
        for i in range(n):
            f.write(f'int f{i}(int x) {{ int s = 0; for (int j = 0; j < x; j++) {{ s += (j * {i}) ^ (s >> 3); if (s > {i * 7}) s -= x; }} return s + {i}; }}\n')
        f.write('int main(void) { int s = 0;\n' + ''.join(f' s += f{i}(s & 15);\n' for i in range(n)) + ' return s & 1; }\n')
c_file('gen-s.c', 3000)
c_file('gen-l.c', 6000)
c_file('gen-xl.c', 16000)
with open('tmpl.cpp', 'w') as f:
    f.write('#include <map>\n#include <vector>\n#include <string>\n#include <algorithm>\n#include <sstream>\n')
    for i in range(900):
        f.write(f'template <typename T> struct S{i} {{ std::map<std::string, std::vector<T>> m; T go(int n) {{ std::vector<T> v(n); std::sort(v.begin(), v.end()); std::ostringstream o; o << n; m[o.str()] = v; return v.empty() ? T() : v[0]; }} }};\n')
    f.write('int main() { long s = 0;\n' + ''.join(f' s += S{i}<long>().go({i}); s += (long)S{i}<double>().go({i});\n' for i in range(900)) + ' return s & 1; }\n')
import os
os.makedirs('proj', exist_ok=True)
for i in range(64):
    with open(f'proj/m{i}.c', 'w') as f:
        for k in range(400):
            f.write(f'static int g{k}(int x) {{ return x * {k + i} + (x >> {k % 7}); }}\n')
        f.write(f'int m{i}(int x) {{ return ' + ' + '.join(f'g{k}(x)' for k in range(400)) + '; }\n')
with open('proj/main.c', 'w') as f:
    f.write(''.join(f'int m{i}(int);\n' for i in range(64)) + 'int main(void) { return (' + ' + '.join(f'm{i}(1)' for i in range(64)) + ') & 1; }\n')
with open('proj/Makefile', 'w') as f:
    objs = ' '.join(f'm{i}.o' for i in range(64)) + ' main.o'
    f.write(f'CFLAGS=-O2\nprog: {objs}\n\t$(CC) -o $@ $^\n%.o: %.c\n\t$(CC) $(CFLAGS) -c -o $@ $<\n')
with open('gen.rs', 'w') as f:
    for i in range(1500):
        f.write(f'fn f{i}(v: &mut Vec<u64>) -> u64 {{ v.push({i}); v.iter().map(|x| x.wrapping_mul({i + 3})).fold(0, |a, b| a ^ b) }}\n')
    f.write('fn main() { let mut v = Vec::new(); let mut s = 0u64;\n' + ''.join(f' s ^= f{i}(&mut v);\n' for i in range(1500)) + ' std::process::exit((s & 1) as i32); }\n')
PY
head -c 60000000 /dev/urandom > random.bin
cat text-l text-l text-s > text-xl

# ---- build -----------------------------------------------------------------------------------
rec build gcc-s -- gcc -O2 -c gen-s.c -o gen-s.o
rec build gcc-l -- gcc -O2 -c gen-l.c -o gen-l.o
rec build gcc-O0-xl -- gcc -O0 -g -c gen-xl.c -o gen-xl0.o
rec build gxx-templates -- g++ -O1 -c tmpl.cpp -o tmpl.o
rec build make-j1 -- make -s -C proj -j1 -B prog
rec build make-j2 -- make -s -C proj -j2 -B prog
rec build rustc-O -- rustc -O -o gen-rs gen.rs
rec build rustc-debug -- rustc -o gen-rs-d gen.rs

# ---- compression -----------------------------------------------------------------------------
rec compression gzip-6 -- sh -c 'cat text-xl text-xl | gzip -6 > out.gz'
rec compression gzip-d -- sh -c 'for i in 1 2 3 4; do gzip -d < out.gz > out.txt; done'
rec compression bzip2-9 -- sh -c 'cat text-l text-l | bzip2 -9 > out.bz2'
rec compression bzip2-random -- sh -c 'bzip2 -1 < random.bin > out2.bz2'
rec compression xz-1 -- sh -c 'xz -1 -T1 < text-xl > out.xz'
rec compression xz-6-T2 -- sh -c 'xz -6 -T2 < text-s > out6.xz'
rec compression zstd-levels -- sh -c 'for l in 3 9 12 6; do zstd -q -$l -T1 < text-xl > out.zst; done'
rec compression zstd-19 -- sh -c 'zstd -q -19 -T2 < text-s > out19.zst'
rec compression brotli-5 -- sh -c 'brotli -q 5 -c text-xl > out.br'
rec compression 7z-lzma2 -- 7z a -bd -mx=5 -mmt=2 out.7z text-s random.bin
rm -f out* 
# ---- text ------------------------------------------------------------------------------------
rec text sort-s -- sort -S 64M -o sorted-s text-l
rec text sort-l -- sh -c 'cat text-xl text-xl | sort -S 256M --parallel=2 -o sorted-l'
rec text awk-wordcount -- gawk '{for (i = 1; i < NF; i++) c[$i]++} END {for (w in c) n++; print n}' text-xl text-xl text-l
rec text grep-regex -- sh -c 'for r in "(ab|cd)[a-z]+ [0-9]{4}" "^[a-z]{3} " "([a-z])\\1" "[0-9]{5}$" "x.*y.*z"; do grep -cE "$r" text-xl; done'
rec text sed-rewrite -- sh -c 'sed -E "s/([a-z]+) ([a-z]+)/\2 \1/g" text-xl > sed.out'
rec text jq-group -- jq -s 'group_by(.user) | map({user: .[0].user, ms: (map(.ms) | add)}) | length' events.jsonl
rec text jq-stream -- sh -c 'for f in "select(.ms > 2500) | {id, ms}" ".tags[0]" "{u: .user, n: (.tags | length)}" "select(.id % 3 == 0) | .user"; do jq -c "$f" events.jsonl | wc -l; done'
rec text pipeline -- sh -c 'tr " " "\n" < text-xl | sort -S 128M | uniq -c | sort -rn | head -20'
rm -f sorted-* sed.out

# ---- storage ---------------------------------------------------------------------------------
rec storage fio-seqwrite -- fio --name=w --filename=fio.dat --size=1536M --rw=write --bs=1M --ioengine=psync --end_fsync=1
rec storage fio-randread -- fio --name=r --filename=fio.dat --size=512M --rw=randread --bs=16k --direct=1 --runtime=12 --time_based
rec storage fio-mixed -- fio --name=m --filename=fio.dat --size=512M --rw=randrw --rwmixread=60 --bs=64k --direct=1 --runtime=12 --time_based --rate=40m,20m
rec storage dd-write -- sh -c 'dd if=/dev/zero of=dd.dat bs=4M count=600 conv=fsync status=none; dd if=dd.dat of=/dev/null bs=4M iflag=direct status=none'
rec storage stress-vm -- stress-ng --vm 1 --vm-bytes 400M --vm-method rowhammer --timeout 8s --quiet
rec storage stress-phases -- sh -c 'stress-ng --cpu 1 --timeout 4s --quiet; stress-ng --vm 2 --vm-bytes 200M --timeout 5s --quiet; stress-ng --hdd 1 --hdd-bytes 128M --timeout 5s --quiet'
rec storage sysbench-cpu -- sysbench cpu --threads=2 --time=10 run
rec storage sysbench-memory -- sysbench memory --threads=1 --memory-total-size=200G --time=12 run
rec storage sysbench-fileio -- sh -c 'sysbench fileio --file-total-size=256M prepare >/dev/null && sysbench fileio --file-total-size=256M --file-test-mode=rndrw --time=10 --file-extra-flags=direct run; sysbench fileio --file-total-size=256M cleanup >/dev/null'
rm -f fio.dat dd.dat

# ---- server (under a load generator outside the recorded tree) --------------------------------
mkdir -p www && head -c 200000 /dev/urandom > www/big.bin && echo hello > www/index.html
cat > nginx.conf <<NGX
worker_processes 2;
pid $W/nginx.pid;
error_log stderr;
events { worker_connections 512; }
http { access_log off; server { listen 127.0.0.1:8080; root $W/www; } }
NGX
serve server nginx-ab 8080 "nginx -c $W/nginx.conf -g 'daemon off;'" \
  "ab -q -n 20000 -c 4 http://127.0.0.1:8080/index.html; sleep 2; ab -q -n 6000 -c 16 http://127.0.0.1:8080/big.bin; sleep 1; ab -q -n 30000 -c 2 http://127.0.0.1:8080/index.html"
serve server nginx-wrk 8080 "nginx -c $W/nginx.conf -g 'daemon off;'" \
  "wrk -t2 -c8 -d4s http://127.0.0.1:8080/big.bin; sleep 2; wrk -t1 -c2 -d4s http://127.0.0.1:8080/index.html"
cat > lighttpd.conf <<LTD
server.document-root = "$W/www"
server.port = 8081
server.bind = "127.0.0.1"
LTD
serve server lighttpd-wrk 8081 "lighttpd -D -f $W/lighttpd.conf" \
  "wrk -t2 -c16 -d5s http://127.0.0.1:8081/big.bin; sleep 2; wrk -t2 -c64 -d5s http://127.0.0.1:8081/index.html"
serve server memcached-slap 11211 "memcached -u nobody -m 512 -t 2 -l 127.0.0.1" \
  "memcslap --servers=127.0.0.1:11211 --concurrency=4 --execute-number=20000 --binary; sleep 2; memcslap --servers=127.0.0.1:11211 --concurrency=16 --execute-number=20000 --test=get"

# ---- database --------------------------------------------------------------------------------
cat > sql-l.sql <<'SQL'
CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1500000)
INSERT INTO t(k, v) SELECT abs(random()) % 100000, hex(randomblob(24)) FROM c;
CREATE INDEX tk ON t(k);
SELECT k % 100, count(*), max(v) FROM t GROUP BY k % 100 ORDER BY 2 DESC LIMIT 3;
SELECT count(*) FROM t a JOIN t b ON a.k = b.k WHERE a.id < 40000;
UPDATE t SET v = upper(v) WHERE k % 7 = 0;
DELETE FROM t WHERE k % 3 = 0;
VACUUM;
SQL
sed -i 's/1500000/3000000/' sql-l.sql
sed 's/3000000/800000/; s/40000/20000/' sql-l.sql > sql-s.sql
rec database sqlite-s -- sh -c 'rm -f db-s.sqlite; sqlite3 db-s.sqlite < sql-s.sql'
rec database sqlite-l -- sh -c 'rm -f db-l.sqlite; sqlite3 db-l.sqlite < sql-l.sql'
rec database sqlite-memory -- sh -c 'sqlite3 :memory: < sql-l.sql'
PG=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
mkdir -p pg && chown postgres pg
setpriv --reuid=postgres --regid=postgres --init-groups "$PG/initdb" -D "$W/pg/data" -A trust >/dev/null
serve database postgres-pgbench 5432 \
  "setpriv --reuid=postgres --regid=postgres --init-groups $PG/postgres -D $W/pg/data -k $W/pg -c listen_addresses=127.0.0.1 -c shared_buffers=128MB" \
  "$PG/pgbench -h 127.0.0.1 -U postgres -i -s 8 postgres; sleep 1; $PG/pgbench -h 127.0.0.1 -U postgres -c 4 -T 8 postgres; sleep 1; $PG/pgbench -h 127.0.0.1 -U postgres -c 1 -S -T 6 postgres"
serve database redis-benchmark 6379 "redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no" \
  "redis-benchmark -q -n 60000 -c 8 -t set,get,lpush,lpop; sleep 1; redis-benchmark -q -n 20000 -c 2 -d 4096 -t set,get; sleep 1; redis-benchmark -q -n 300000 -r 1000000 -c 16 -t set"
serve database redis-aof 6380 "redis-server --port 6380 --bind 127.0.0.1 --dir $W --appendonly yes --appendfsync everysec" \
  "redis-benchmark -p 6380 -q -n 100000 -r 500000 -c 8 -d 512 -t set,incr,hset; sleep 2; redis-benchmark -p 6380 -q -n 50000 -c 4 -t get"

# ---- runtime (garbage-collected) -------------------------------------------------------------
cat > alloc.py <<'PY'
import sys, random
n = int(sys.argv[1]); random.seed(1)
for phase in range(3):
    d = {i: [random.random() for _ in range(20)] for i in range(n)}
    s = sorted(d, key=lambda k: d[k][3])
    del d, s
    text = ' '.join(str(random.random()) for _ in range(n * 4))
    words = {}
    for w in text.split():
        words[w[:5]] = words.get(w[:5], 0) + 1
PY
rec runtime python-s -- python3 alloc.py 200000
rec runtime python-l -- python3 alloc.py 700000
cat > alloc.js <<'JS'
const n = +process.argv[2];
for (let phase = 0; phase < 4; phase++) {
  let objs = [];
  for (let i = 0; i < n; i++) objs.push({ id: i, s: 'x'.repeat(i % 64), a: new Array(i % 32).fill(i) });
  objs.sort((a, b) => (a.id * 7919) % 1000 - (b.id * 7919) % 1000);
  const m = new Map(); for (const o of objs) m.set(o.s + o.id, o);
  objs = null;
  const t = Date.now(); while (Date.now() - t < 500) {} // a compute phase without allocation
}
JS
rec runtime node-s -- node alloc.js 300000
rec runtime node-l -- node --max-old-space-size=1024 alloc.js 1200000
cat > alloc.rb <<'RB'
n = ARGV[0].to_i
3.times do
  h = {}
  n.times { |i| h["k#{i}"] = Array.new(i % 16) { |j| j * i } }
  h.sort_by { |k, v| v.size }.first(10)
  s = (1..n).map { |i| i.to_s * 3 }.join(",")
  s.split(",").group_by(&:size).size
end
RB
rec runtime ruby-s -- ruby alloc.rb 500000
rec runtime ruby-l -- ruby alloc.rb 1500000
mkdir -p java && cat > java/Alloc.java <<'JV'
import java.util.*;
public class Alloc {
  public static void main(String[] a) {
    int n = Integer.parseInt(a[0]);
    for (int phase = 0; phase < 4; phase++) {
      List<int[]> keep = new ArrayList<>();
      Map<String, Integer> m = new HashMap<>();
      for (int i = 0; i < n; i++) { keep.add(new int[i % 50]); m.put("k" + i, i); }
      Collections.shuffle(keep, new Random(phase));
      long s = 0; for (int[] x : keep) s += x.length;
      System.out.println(s + m.size());
    }
  }
}
JV
rec runtime java-s -- java -Xmx512m java/Alloc.java 1500000
rec runtime java-l -- java -Xmx1536m -XX:+UseParallelGC java/Alloc.java 6000000
cat > alloc.lua <<'LUA'
local n = tonumber(arg[1])
for phase = 1, 3 do
  local t = {}
  for i = 1, n do t[i] = { i, tostring(i) .. "x", { i % 7 } } end
  table.sort(t, function(a, b) return a[2] < b[2] end)
  t = nil
  collectgarbage()
end
LUA
rec runtime lua-s -- lua5.4 alloc.lua 700000
rec runtime lua-l -- lua5.4 alloc.lua 1200000
rec runtime guile -- guile-3.0 -c '(define (go n) (let loop ((i 0) (acc (list))) (if (< i n) (loop (+ i 1) (cons (make-string (modulo i 40) #\a) acc)) (length (sort acc (lambda (a b) (< (string-length a) (string-length b)))))))) (do ((p 0 (+ p 1))) ((= p 4)) (display (go 600000)) (newline))'

# ---- media -----------------------------------------------------------------------------------
rec media sox-synth -- sox -n -r 48000 -c 2 tone.wav synth 900 sine 220-880 sine 330 reverb 50 chorus 0.7 0.9 55 0.4 0.25 2 -t
rec media sox-effects -- sox tone.wav fx.wav tempo 1.3 pitch -300 norm -3 highpass 300
CONVERT=$(ls /usr/bin/convert-im6.q16 2>/dev/null || command -v convert)
rec media imagemagick-s -- "$CONVERT" -size 3000x3000 plasma:fractal -blur 0x6 -resize 50% img-s.png
rec media imagemagick-l -- "$CONVERT" -size 4000x3000 plasma:fractal -swirl 180 -blur 0x3 -resize 3000x2000 img-l.jpg
cat > doc.ps <<'PS'
%!PS
/Helvetica findfont 14 scalefont setfont
1 1 30 { /p exch def
  0 1 400 { /i exch def newpath i 1.3 mul 100 add i p mul 37 mod 300 add moveto 200 i 3 mul sin mul 0 rlineto stroke } for
  72 72 moveto (page) show showpage } for
PS
rec media ghostscript -- gs -q -dNOPAUSE -dBATCH -sDEVICE=png16m -r300 -sOutputFile=page%03d.png doc.ps
sed 's/1 1 30/1 1 120/' doc.ps > doc-l.ps
rec media ghostscript-r150 -- gs -q -dNOPAUSE -dBATCH -sDEVICE=pnggray -r150 -sOutputFile=gray%03d.png doc-l.ps

echo "corpus: $(ls "$TRACES"/train/*.jsonl | wc -l) train, $(ls "$TRACES"/test/*.jsonl | wc -l) test traces, $(du -sh "$TRACES" | cut -f1)"
