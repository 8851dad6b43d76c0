//! `prescient host`: one supervisor for many microVMs on one host, with a shared pool.
//!
//! It launches VMs from specs (one `prescient` process each), watches each through its process
//! and its API socket, and every window reads each VM's forecast (`GET /predictor`), divides
//! the host's budget ([`pool::divide`]) and grants each VM its share (`PATCH /predictor`).
//! The host API ([`api`]) creates, lists, inspects and stops VMs and shows the pool; the VMs
//! are recorded in the state directory, so a restarted supervisor finds them again.

pub mod api;
pub mod budget;
pub mod claim;
pub mod pool;
pub mod spec;
pub mod vms;
pub mod warm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use predictor::resource::{PerResource, Resource};

use crate::api::http::Response;
use crate::vmm_config::VmConfig;
use api::HostRequest;
use budget::HostBudget;
use claim::{ClaimTimes, Desk, Timeline, Work};
use pool::{Claim, GrantChange, PoolLog, PoolWindow};
use spec::{Class, VmRequest};
use vms::{Files, ManagedVm, Ready, VmState};
use warm::{PoolSpec, WarmPool};

/// Warm VMs started or let go per pool and window at most.
const WARM_PER_WINDOW: usize = 4;

/// What the supervisor's loop serves, in the order it came.
enum Event {
    /// A host API request the desk did not answer, and where its answer goes.
    Request {
        request: HostRequest,
        reply: Sender<Response>,
        /// When the host API read it, for the time it waits for the loop.
        received: Instant,
    },
    /// A warm VM made on a helper thread.
    Made(Box<Made>),
    /// A warm VM the desk handed out (`resumed`: running) or found would not resume.
    Claimed {
        pool: String,
        ready: Box<Ready>,
        resumed: bool,
    },
}

/// A warm VM made on a helper thread (a process start and a snapshot load), for its pool.
struct Made {
    pool: String,
    id: String,
    spans: PerResource<spec::Span>,
    vm: Result<ManagedVm, vms::VmError>,
    ms: f64,
}

/// Windows of a rise the pool grants ahead beyond the VM's own horizon: it reads a forecast up
/// to a window after the VM made it, and the grant reaches the VM's predictor up to a window
/// later.
const LEAD_WINDOWS: f64 = 2.0;

/// Window bounds of the pool, as for a VM's predictor.
const WINDOW_MS: std::ops::RangeInclusive<u64> = 10..=10_000;

// `prescient host` arguments.
// Not a doc comment: clap would take it as the subcommand's description, over the
// one on `prescient`'s list of tools (whose arguments are defined late, main.rs).
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// What the pool may grant in all: cpu (cores), mem (MiB, or with K/M/G), blk and net
    /// (MiB/s, or with K/M/G), e.g. `mem=24G,cpu=2,blk=800M,net=1G`.
    #[arg(long, value_name = "RESOURCE=AMOUNT,...")]
    pub budget: HostBudget,
    /// Serve the host API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// Where the VMs' records, configs, sockets and logs are kept (default: the API socket's
    /// path with `.d` added).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The pool's window: how often forecasts are read and grants set.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub window_ms: u64,
}

/// Errors of starting the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("--window-ms {0}: must be between 10 and 10000")]
    Window(u64),
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Vms(#[from] vms::VmError),
    #[error(transparent)]
    Api(#[from] api::HostApiError),
}

/// The supervisor: the VMs, the budget and the pool's log, owned by its loop.
pub struct Supervisor {
    budget: HostBudget,
    files: Files,
    window: Duration,
    vms: BTreeMap<String, ManagedVm>,
    pools: BTreeMap<String, WarmPool>,
    /// The warm VMs ready to hand out, claimed on the host API's threads.
    desk: Desk,
    /// What the loop serves: requests, made warm VMs, claims done.
    events: (Sender<Event>, Receiver<Event>),
    /// The floors the warm VMs being made will hold.
    making: PerResource<f64>,
    log: PoolLog,
    /// Start grants of claims heard of since the last window, for its log.
    claimed: Vec<GrantChange>,
    /// The loop's recent work, to tell a claim what it waited behind.
    timeline: Timeline,
    seq: u64,
    started: Instant,
    next_id: u64,
}

fn json(status: u16, value: serde_json::Value) -> Response {
    Response::json(status, value.to_string())
}

impl Supervisor {
    /// Opens the state directory and adopts the VMs recorded there.
    pub fn new(args: &HostArgs) -> Result<Self, HostError> {
        if !WINDOW_MS.contains(&args.window_ms) {
            return Err(HostError::Window(args.window_ms));
        }
        let dir = args.state_dir.clone().unwrap_or_else(|| {
            let mut p = args.api_sock.clone().into_os_string();
            p.push(".d");
            PathBuf::from(p)
        });
        std::fs::create_dir_all(&dir).map_err(|source| HostError::StateDir {
            path: dir.clone(),
            source,
        })?;
        let window = Duration::from_millis(args.window_ms);
        let files = Files { dir };
        let mut vms = BTreeMap::new();
        for record in files.records()? {
            let mut vm = ManagedVm::adopt(record, window * 5);
            // Warm pools are not kept across restarts: their warm VMs are let go.
            if let VmState::Warm { pool } = &vm.state {
                tracing::info!("host: letting warm VM {} of pool {pool} go", vm.record.id);
                vm.stop();
                files.remove(&vm.record.id);
                continue;
            }
            tracing::info!(
                "host: found VM {} ({})",
                vm.record.id,
                match &vm.state {
                    VmState::Exited { reason } => reason,
                    _ => "running",
                }
            );
            vms.insert(vm.record.id.clone(), vm);
        }
        Ok(Self {
            budget: args.budget,
            files,
            window,
            vms,
            pools: BTreeMap::new(),
            desk: Desk::default(),
            events: channel(),
            making: PerResource::default(),
            log: PoolLog::default(),
            claimed: Vec::new(),
            timeline: Timeline::default(),
            seq: 0,
            started: Instant::now(),
            next_id: 0,
        })
    }

    /// What answers the host API on its client threads: a warm claim is served there when a
    /// warm VM is ready (see [`claim`]); everything else waits for the loop.
    fn answer(&self) -> Arc<api::Answer> {
        let (desk, files, events) = (self.desk.clone(), self.files.clone(), self.events.0.clone());
        Arc::new(move |request: HostRequest, received: Instant| {
            if let Some(pool) = warm_claim(&request) {
                let failed = |ready: Ready, e| {
                    tracing::warn!("host: warm VM {}: {e}; letting it go", ready.id);
                    let _ = events.send(Event::Claimed {
                        pool: pool.clone(),
                        ready: Box::new(ready),
                        resumed: false,
                    });
                };
                let times = ClaimTimes::at_desk(received);
                if let Some((described, ready)) = desk.claim(&pool, &files, times, failed) {
                    let ready = Box::new(ready);
                    let _ = events.send(Event::Claimed {
                        pool,
                        ready,
                        resumed: true,
                    });
                    return json(201, described);
                }
            }
            let (reply, answer) = channel();
            let gone = || Response::fault(503, "the supervisor is shutting down");
            let request = Event::Request {
                request,
                reply,
                received,
            };
            if events.send(request).is_err() {
                return gone();
            }
            answer.recv().unwrap_or_else(|_| gone())
        })
    }

    /// Serves events between windows until the process is killed; the VMs live on.
    pub fn run(&mut self) {
        let mut next = Instant::now() + self.window;
        loop {
            let now = Instant::now();
            if now < next {
                // The loop holds a sender itself: the channel never disconnects.
                if let Ok(event) = self.events.1.recv_timeout(next - now) {
                    let t0 = Instant::now();
                    self.serve(event);
                    self.timeline.record(t0, Instant::now(), Work::Request);
                    continue;
                }
            }
            let t0 = Instant::now();
            self.window_pass();
            self.timeline.record(t0, Instant::now(), Work::Window);
            next += self.window;
            // A window that ran long is not caught up in a burst.
            let now = Instant::now();
            if next < now {
                next = now + self.window;
            }
        }
    }

    fn running(&self) -> impl Iterator<Item = &ManagedVm> {
        self.vms.values().filter(|v| v.state == VmState::Running)
    }

    /// The VMs that hold a grant: running and warm ones.
    fn holding(&self) -> impl Iterator<Item = &ManagedVm> {
        self.vms
            .values()
            .filter(|v| !matches!(v.state, VmState::Exited { .. }))
    }

    /// Floors of the VMs that hold a grant, and of the warm VMs being made.
    fn reserved(&self) -> PerResource<f64> {
        let held = pool::reserved(self.holding().map(|v| &v.record.spans));
        PerResource::from_fn(|r| held[r] + self.making[r])
    }

    /// The grants of the VMs that hold one, and the start grants claims hold that the loop
    /// has not heard of yet.
    fn granted(&self) -> PerResource<f64> {
        let mut sum = self.desk.out();
        for vm in self.holding() {
            for r in Resource::ALL {
                sum[r] += vm.grant[r];
            }
        }
        sum
    }

    fn held(&self) -> PerResource<f64> {
        let mut sum = PerResource::default();
        for vm in self.holding() {
            for r in Resource::ALL {
                sum[r] += vm.hold[r] - vm.record.spans[r].floor;
            }
        }
        sum
    }

    /// One window: reap the dead, read forecasts, divide, grant.
    pub fn window_pass(&mut self) {
        let t0 = Instant::now();
        self.seq += 1;
        let mut changes = Vec::new();
        for vm in self.vms.values_mut() {
            let before = vm.grant;
            if vm.check_exit() {
                self.log.returned += 1;
                let VmState::Exited { reason } = &vm.state else {
                    unreachable!("check_exit said it exited")
                };
                let reason = reason.clone();
                tracing::warn!("host: VM {}: {reason}; its grant is returned", vm.record.id);
                for r in Resource::ALL {
                    changes.push(GrantChange {
                        vm: vm.record.id.clone(),
                        resource: r.name(),
                        class: vm.record.class,
                        want: 0.0,
                        from: before[r],
                        to: 0.0,
                        hold: 0.0,
                        reason: format!("returned: {reason}"),
                    });
                }
            }
        }
        // Side by side, each within a window: a VMM that does not answer delays the others'
        // grants by at most that.
        let running = self
            .vms
            .values_mut()
            .filter(|v| v.state == VmState::Running)
            .collect();
        vms::observe_all(running, self.window);
        let ids: Vec<String> = self.running().map(|v| v.record.id.clone()).collect();
        let mut target: Vec<PerResource<f64>> = ids.iter().map(|id| self.vms[id].grant).collect();
        let mut hold: Vec<PerResource<f64>> = ids.iter().map(|id| self.vms[id].hold).collect();
        let mut wanted = PerResource::default();
        let mut short = PerResource::default();
        // Under the desk's lock from the division to the new offer: no claim takes the slack
        // the division hands out, and a claim waits for this arithmetic at most, never for a
        // VM's API.
        let (vms, budget, making) = (&self.vms, &self.budget, &self.making);
        self.desk.redivide(|lent| {
            for r in Resource::ALL {
                let claims: Vec<Claim> = ids
                    .iter()
                    .map(|id| {
                        let vm = &vms[id];
                        let span = vm.record.spans[r];
                        // The one-window forecast (expected and upper band) carried on at its rise
                        // over the rest of the VM's horizon (which its own allocation covers) and
                        // the windows the grant lags, in whole steps, one step over; a VM with no
                        // forecast yet keeps what it has.
                        let ahead_windows = (vm.horizon - 1) as f64 + LEAD_WINDOWS;
                        let lead = ahead_windows * vm.rise[r];
                        let ahead = |v: Option<f64>| match v {
                            Some(v) => ((v + lead) / span.step).ceil() * span.step + span.step,
                            None => vm.grant[r],
                        };
                        let (need, want) = (ahead(vm.point[r]), ahead(vm.want[r]));
                        let ramping = vm.rose_at[r]
                            .is_some_and(|w| ((vm.windows - w) as f64) < ahead_windows);
                        Claim {
                            class: vm.record.class,
                            span,
                            need,
                            want,
                            rising: vm.rise[r] > 0.0,
                            ramping,
                        }
                    })
                    .collect();
                let grants = pool::divide(budget.0[r] - lent[r], &claims);
                for (i, (g, c)) in grants.iter().zip(&claims).enumerate() {
                    target[i][r] = g.max;
                    hold[i][r] = g.hold;
                    let full = c.want.clamp(c.span.floor, c.span.ceiling);
                    wanted[r] += full;
                    if g.max + c.span.step <= full {
                        short[r] += 1;
                        if c.class == Class::Guaranteed {
                            self.log.guaranteed_short[r] += 1;
                        }
                    }
                }
            }
            // The most each VM may hold while its grant moves to its target (apply moves it
            // only between the two), the floors of the warm VMs being made, and what claims
            // hold unsettled: what is left is the claims' until the next division.
            let mut bound = lent;
            for (id, t) in ids.iter().zip(&target) {
                for r in Resource::ALL {
                    bound[r] += vms[id].grant[r].max(t[r]);
                }
            }
            for vm in vms
                .values()
                .filter(|v| matches!(v.state, VmState::Warm { .. }))
            {
                for r in Resource::ALL {
                    bound[r] += vm.grant[r];
                }
            }
            PerResource::from_fn(|r| budget.0[r] - bound[r] - making[r])
        });
        self.log.decisions += (ids.len() * Resource::ALL.len()) as u64;
        changes.append(&mut self.claimed);
        self.apply(&ids, &target, &hold, &mut changes);
        let window = PoolWindow {
            seq: self.seq,
            t_ms: self.started.elapsed().as_millis() as u64,
            budget: self.budget.0,
            granted: self.granted(),
            wanted,
            held: self.held(),
            vms: ids.len(),
            short,
            changes,
        };
        self.log.push(window);
        self.tend_warm_pools();
        self.log.busy_us += t0.elapsed().as_micros() as u64;
    }

    fn serve(&mut self, event: Event) {
        match event {
            Event::Request {
                request,
                reply,
                received,
            } => {
                let _ = reply.send(self.handle(request, received));
            }
            Event::Made(made) => self.made(*made),
            Event::Claimed {
                pool,
                ready,
                resumed,
            } => {
                if resumed {
                    if let Some(pool) = self.pools.get_mut(&pool) {
                        pool.arrival();
                        pool.handed_out += 1;
                    }
                }
                self.claim_done(&pool, *ready, resumed);
            }
        }
    }

    /// A claim's warm VM: its start grant settled with the desk and logged, and the VM from
    /// now on one like any other (`resumed`), or let go.
    fn claim_done(&mut self, pool: &str, ready: Ready, resumed: bool) {
        self.desk.settle(ready.lent());
        if !resumed {
            self.let_go(&ready.id);
            return;
        }
        let Some(vm) = self.vms.get_mut(&ready.id) else {
            tracing::warn!("host: handed out {}, a VM it does not know", ready.id);
            return;
        };
        let before = vm.grant;
        vm.handed_out(ready);
        for r in Resource::ALL
            .into_iter()
            .filter(|&r| vm.grant[r] != before[r])
        {
            self.claimed.push(GrantChange {
                vm: vm.record.id.clone(),
                resource: r.name(),
                class: vm.record.class,
                want: vm.grant[r],
                from: before[r],
                to: vm.grant[r],
                hold: vm.hold[r],
                reason: format!(
                    "claimed from warm pool {pool}: its start grant, set before its resume"
                ),
            });
        }
    }

    /// Kills a warm VM and forgets it.
    fn let_go(&mut self, id: &str) {
        if let Some(mut vm) = self.vms.remove(id) {
            vm.kill();
        }
        self.files.remove(id);
    }

    /// Each warm pool: the window's arrivals into its forecast, then warm VMs started up to
    /// its target or let go above it, a few per window.
    fn tend_warm_pools(&mut self) {
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            // Warm VMs that died are no longer ready.
            let vms = &self.vms;
            self.desk.retain(&name, |id| {
                matches!(vms.get(id).map(|v| &v.state), Some(VmState::Warm { .. }))
            });
            let ready = self.desk.len(&name);
            let pool = self.pools.get_mut(&name).expect("a pool");
            pool.close_window(ready);
            let (have, target) = (ready + pool.pending, pool.target());
            for _ in 0..(target.saturating_sub(have)).min(WARM_PER_WINDOW) {
                if let Err(e) = self.make_warm(&name) {
                    tracing::warn!("host: warm pool {name}: {e}");
                    break;
                }
            }
            for _ in 0..(have.saturating_sub(target)).min(WARM_PER_WINDOW) {
                // Popped from the desk: no claim can be handing it out.
                let Some(ready) = self.desk.take(&name) else {
                    break;
                };
                self.pools.get_mut(&name).expect("a pool").released += 1;
                self.let_go(&ready.id);
            }
        }
    }

    /// Starts making one warm VM of pool `name` on a helper thread: a VMM restored from the
    /// pool's snapshot, paused. Its floors are reserved from now on.
    fn make_warm(&mut self, name: &str) -> Result<(), String> {
        self.next_id += 1;
        let pool = &self.pools[name];
        let mut spec = pool.launch.clone();
        spec.id = format!("{name}-{}-{}", std::process::id(), self.next_id);
        pool::admit(&self.budget, &self.reserved(), &spec.spans).map_err(|e| e.to_string())?;
        for r in Resource::ALL {
            self.making[r] += spec.spans[r].floor;
        }
        let floors = spec.spans.map(|_, s| s.floor);
        // Its floors come out of the slack offered to claims.
        self.desk.spend(floors);
        let (files, snapshot, tx) = (
            self.files.clone(),
            pool.snapshot.clone(),
            self.events.0.clone(),
        );
        let (pool_name, timeout) = (name.to_string(), self.window * 5);
        self.pools.get_mut(name).expect("a pool").pending += 1;
        std::thread::Builder::new()
            .name("host-warm".into())
            .spawn(move || {
                let t0 = Instant::now();
                let snapshot = (snapshot.0.as_path(), snapshot.1.as_path());
                let vm = ManagedVm::restore(&files, &spec, floors, snapshot, &pool_name, timeout);
                let _ = tx.send(Event::Made(Box::new(Made {
                    pool: pool_name,
                    id: spec.id,
                    spans: spec.spans,
                    vm,
                    ms: t0.elapsed().as_secs_f64() * 1000.0,
                })));
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// A warm VM made: ready at the desk (or let go if its pool is gone).
    fn made(&mut self, made: Made) {
        for r in Resource::ALL {
            self.making[r] -= made.spans[r].floor;
        }
        if let Some(pool) = self.pools.get_mut(&made.pool) {
            pool.pending -= 1;
            if made.vm.is_ok() {
                pool.made_in(made.ms);
            }
        }
        let mut vm = match made.vm {
            Ok(vm) => vm,
            Err(e) => {
                tracing::warn!("host: warm VM {}: {e}", made.id);
                self.files.remove(&made.id);
                return;
            }
        };
        let ready = vm.ready();
        self.vms.insert(made.id.clone(), vm);
        match ready.map(|r| self.desk.push(&made.pool, r)) {
            Ok(true) => {}
            Ok(false) => self.let_go(&made.id),
            Err(e) => {
                tracing::warn!("host: warm VM {}: {e}", made.id);
                self.let_go(&made.id);
            }
        }
    }

    /// `PUT /pools/NAME`: boots a template VM from the config, snapshots it after
    /// `snapshot_after_ms`, and keeps warm VMs restored from that snapshot from the next
    /// window on.
    fn put_pool(&mut self, name: String, body: &[u8]) -> Response {
        if self.pools.contains_key(&name) {
            return Response::fault(409, format!("a warm pool {name} exists already"));
        }
        let spec = match PoolSpec::parse(&name, body) {
            Ok(s) => s,
            Err(e) => return Response::fault(400, e),
        };
        let checked = VmConfig::parse(&spec.config.to_string())
            .map_err(|(path, e)| spec::SpecError::ConfigSyntax {
                path,
                message: e.to_string(),
            })
            .and_then(|c| spec::check(format!("{name}-template"), spec.class, c, None));
        let launch = match checked {
            Ok(l) => l,
            Err(e) => return Response::fault(400, e),
        };
        if let Err(e) = pool::admit(&self.budget, &self.reserved(), &launch.spans) {
            return Response::fault(409, e);
        }
        let floors = launch.spans.map(|_, s| s.floor);
        let t0 = Instant::now();
        let mut template = match ManagedVm::launch(&self.files, &launch, floors, self.window * 5) {
            Ok(vm) => vm,
            Err(e) => {
                self.files.remove(&launch.id);
                return Response::fault(500, e);
            }
        };
        let boot_ms = t0.elapsed().as_secs_f64() * 1000.0;
        std::thread::sleep(Duration::from_millis(spec.snapshot_after_ms));
        let snapshot = (
            self.files.dir.join(format!("{name}.snapshot")),
            self.files.dir.join(format!("{name}.mem")),
        );
        let made = template.snapshot(&snapshot.0, &snapshot.1);
        template.kill();
        self.files.remove(&launch.id);
        if let Err(e) = made {
            return Response::fault(500, e);
        }
        match WarmPool::new(name.clone(), spec, launch, snapshot, boot_ms, self.window) {
            Ok(pool) => {
                let described = pool.describe(Vec::new());
                self.desk.open(&name);
                self.pools.insert(name, pool);
                json(201, described)
            }
            Err(e) => Response::fault(500, e),
        }
    }

    /// `POST /vms {"from_pool": NAME}` that the desk could not serve (no warm VM was ready):
    /// one made since, resumed, or else one booted cold from the pool's config.
    fn claim(&mut self, name: &str, received: Instant) -> Response {
        let times = ClaimTimes::queued(received, &self.timeline);
        let Some(pool) = self.pools.get_mut(name) else {
            return Response::fault(404, format!("no warm pool {name} on this host"));
        };
        pool.arrival();
        let mut failed = Vec::new();
        let served = self
            .desk
            .claim(name, &self.files, times.clone(), |ready, e| {
                tracing::warn!("host: warm VM {}: {e}; letting it go", ready.id);
                failed.push(ready);
            });
        for ready in failed {
            self.claim_done(name, ready, false);
        }
        if let Some((described, ready)) = served {
            self.pools.get_mut(name).expect("a pool").handed_out += 1;
            self.claim_done(name, ready, true);
            return json(201, described);
        }
        let pool = self.pools.get_mut(name).expect("a pool");
        pool.cold_start();
        self.next_id += 1;
        let mut spec = pool.launch.clone();
        spec.id = format!("{name}-{}-{}", std::process::id(), self.next_id);
        let mut r = self.launch(spec);
        if r.status == 201 {
            if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&r.body) {
                v["warm"] = false.into();
                v["claim"] = times.to_json();
                r.body = v.to_string();
            }
        }
        r
    }

    /// Sets the grants towards `target` and the holds towards `hold`: every shrink (and every
    /// hold lowered) first, then the grows that fit beside what is granted, class by class, so
    /// that the grants in force never add up to more than the budget, even while a VM is slow
    /// to take a shrink. A hold never exceeds the grant in force. A VM whose forecast could not
    /// be read this window keeps its grant: asking it to change would wait for it too.
    fn apply(
        &mut self,
        ids: &[String],
        target: &[PerResource<f64>],
        hold: &[PerResource<f64>],
        changes: &mut Vec<GrantChange>,
    ) {
        // Small shrinks wait while the grows fit without them (fewer resizes); a resource
        // whose grows need the room takes every shrink now.
        let small = |vm: &ManagedVm, r: Resource, to: f64| {
            let span = vm.record.spans[r];
            vm.grant[r] - to < (span.ceiling * 0.02).max(span.step * 2.0)
        };
        let answered: Vec<usize> = (0..ids.len())
            .filter(|&i| self.vms[&ids[i]].api_error.is_none())
            .collect();
        let mut after = self.granted();
        let mut grows: PerResource<f64> = PerResource::default();
        for &i in &answered {
            let (vm, t) = (&self.vms[&ids[i]], &target[i]);
            for r in Resource::ALL {
                if t[r] > vm.grant[r] {
                    grows[r] += t[r] - vm.grant[r];
                } else if !small(vm, r, t[r]) {
                    after[r] -= vm.grant[r] - t[r];
                }
            }
        }
        let deadband = PerResource::from_fn(|r| after[r] + grows[r] <= self.budget.0[r] + 1e-9);
        for &i in &answered {
            let (t, h) = (&target[i], &hold[i]);
            let vm = self.vms.get_mut(&ids[i]).expect("a running VM");
            let mut next = vm.grant;
            let mut held = vm.hold;
            for r in Resource::ALL {
                if t[r] < vm.grant[r] && !(deadband[r] && small(vm, r, t[r])) {
                    next[r] = t[r];
                }
                if h[r] < held[r] || held[r] > next[r] {
                    held[r] = h[r].min(next[r]);
                }
            }
            regrant(vm, next, held, "shrink to forecast", changes);
        }
        let mut granted = self.granted();
        let mut order: Vec<(usize, &String)> = answered.iter().map(|&i| (i, &ids[i])).collect();
        order.sort_by_key(|(_, id)| self.vms[*id].record.class);
        for (i, id) in order {
            let vm = self.vms.get_mut(id).expect("a running VM");
            let mut next = vm.grant;
            for r in Resource::ALL {
                let grow = target[i][r] - vm.grant[r];
                if grow <= 0.0 {
                    continue;
                }
                if granted[r] + grow <= self.budget.0[r] + 1e-9 {
                    next[r] = target[i][r];
                    granted[r] += grow;
                }
            }
            let held = PerResource::from_fn(|r| hold[i][r].min(next[r]));
            let before = vm.grant;
            if !regrant(vm, next, held, "grow to forecast", changes) {
                for r in Resource::ALL {
                    granted[r] -= next[r] - before[r];
                }
            }
        }
    }

    /// Answers one host API request, read at `received`.
    pub fn handle(&mut self, request: HostRequest, received: Instant) -> Response {
        match request {
            HostRequest::ListVms => json(200, self.vms.values().map(ManagedVm::describe).collect()),
            HostRequest::GetVm(id) => match self.vms.get(&id) {
                Some(vm) => json(200, vm.describe()),
                None => Response::fault(404, format!("no VM {id}")),
            },
            HostRequest::StopVm(id) => match self.vms.remove(&id) {
                Some(mut vm) => {
                    vm.stop();
                    self.files.remove(&id);
                    Response::no_content()
                }
                None => Response::fault(404, format!("no VM {id}")),
            },
            HostRequest::CreateVm(body) => self.create(&body, received),
            HostRequest::Pool => json(200, self.pool_state()),
            HostRequest::Decisions { since } => json(
                200,
                serde_json::to_value(self.log.since(since)).expect("windows serialise"),
            ),
            HostRequest::ListPools => json(
                200,
                self.pools
                    .values()
                    .map(|p| p.describe(self.desk.ids(&p.name)))
                    .collect(),
            ),
            HostRequest::PutPool(name, body) => self.put_pool(name, &body),
            HostRequest::DeletePool(name) => match self.pools.remove(&name) {
                Some(pool) => {
                    for ready in self.desk.close(&name) {
                        self.let_go(&ready.id);
                    }
                    let _ = std::fs::remove_file(&pool.snapshot.0);
                    let _ = std::fs::remove_file(&pool.snapshot.1);
                    Response::no_content()
                }
                None => Response::fault(404, format!("no warm pool {name}")),
            },
            HostRequest::Metrics => Response {
                content_type: "text/plain; version=0.0.4",
                ..Response::json(200, self.prometheus())
            },
        }
    }

    fn create(&mut self, body: &[u8], received: Instant) -> Response {
        let checked = VmRequest::parse(body).and_then(|req| {
            let config = req.config()?;
            let id = req.id.clone().unwrap_or_else(|| {
                self.next_id += 1;
                format!("vm-{}-{}", std::process::id(), self.next_id)
            });
            Ok(match config {
                Some(c) => Ok(spec::check(id, req.class, c, req.jailer.clone())?),
                None => Err(req.from_pool.unwrap_or_default()),
            })
        });
        match checked {
            Ok(Ok(spec)) => self.launch(spec),
            Ok(Err(pool)) => self.claim(&pool, received),
            Err(e) => Response::fault(400, e),
        }
    }

    fn launch(&mut self, spec: spec::LaunchSpec) -> Response {
        if self.vms.contains_key(&spec.id) {
            return Response::fault(
                409,
                format!(
                    "a VM {} exists already (DELETE /vms/{} first)",
                    spec.id, spec.id
                ),
            );
        }
        if let Err(e) = pool::admit(&self.budget, &self.reserved(), &spec.spans) {
            return Response::fault(409, e);
        }
        let floors = spec.spans.map(|_, s| s.floor);
        // Its floors come out of the slack offered to claims.
        self.desk.spend(floors);
        match ManagedVm::launch(&self.files, &spec, floors, self.window * 5) {
            Ok(vm) => {
                let described = vm.describe();
                tracing::info!("host: VM {} started ({})", spec.id, spec.class.name());
                self.vms.insert(spec.id.clone(), vm);
                json(201, described)
            }
            Err(e) => {
                self.files.remove(&spec.id);
                Response::fault(500, e)
            }
        }
    }

    fn pool_state(&self) -> serde_json::Value {
        let granted = self.granted();
        let reserved = self.reserved();
        let slack = PerResource::from_fn(|r| self.budget.0[r] - granted[r]);
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        serde_json::json!({
            "window": self.seq,
            "window_ms": self.window.as_millis() as u64,
            "budget": self.budget.0,
            "granted": granted,
            "reserved": reserved,
            "slack": slack,
            "claim_allowance": self.desk.allowance(),
            "held": self.held(),
            "running": self.running().count(),
            "exited": self.vms.len() - self.running().count(),
            "decisions": self.log.decisions,
            "decisions_per_s": self.log.decisions as f64 / secs,
            "changes": self.log.changes,
            "returned": self.log.returned,
            "guaranteed_short_windows": self.log.guaranteed_short,
            "busy_us": self.log.busy_us,
            "last": self.log.last(),
        })
    }

    fn prometheus(&self) -> String {
        use std::fmt::Write;
        let granted = self.granted();
        let reserved = self.reserved();
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, values: &PerResource<f64>| {
            let _ = writeln!(out, "# HELP prescient_pool_{name} {help}");
            let _ = writeln!(out, "# TYPE prescient_pool_{name} gauge");
            for r in Resource::ALL {
                let _ = writeln!(
                    out,
                    "prescient_pool_{name}{{resource=\"{}\"}} {}",
                    r.name(),
                    values[r]
                );
            }
        };
        gauge(
            "budget",
            "The host's budget (cores, MiB, MiB/s).",
            &self.budget.0,
        );
        gauge("granted", "Sum of the running VMs' grants.", &granted);
        gauge("reserved", "Sum of the running VMs' floors.", &reserved);
        gauge(
            "held",
            "Slack lent to ramping VMs: what they must hold above their floors.",
            &self.held(),
        );
        let short = self.log.guaranteed_short.map(|_, &v| v as f64);
        gauge(
            "guaranteed_short_windows",
            "Windows in which a guaranteed VM was granted less than its forecast.",
            &short,
        );
        let counters = [
            ("windows_total", "Pool windows run.", self.seq),
            (
                "decisions_total",
                "Grants computed (VMs x resources).",
                self.log.decisions,
            ),
            ("grant_changes_total", "Grants changed.", self.log.changes),
            (
                "returned_total",
                "VMMs found dead and their grants returned.",
                self.log.returned,
            ),
            (
                "busy_microseconds_total",
                "Time spent in pool windows.",
                self.log.busy_us,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP prescient_pool_{name} {help}");
            let _ = writeln!(out, "# TYPE prescient_pool_{name} counter");
            let _ = writeln!(out, "prescient_pool_{name} {value}");
        }
        let _ = writeln!(out, "# HELP prescient_pool_vms VMs by class and state.");
        let _ = writeln!(out, "# TYPE prescient_pool_vms gauge");
        for class in Class::ALL {
            let of = |running: bool| {
                self.vms
                    .values()
                    .filter(|v| v.record.class == class && (v.state == VmState::Running) == running)
                    .count()
            };
            for (state, n) in [("running", of(true)), ("exited", of(false))] {
                let _ = writeln!(
                    out,
                    "prescient_pool_vms{{class=\"{}\",state=\"{state}\"}} {n}",
                    class.name()
                );
            }
        }
        out
    }
}

/// Sets `vm`'s grant to `next` if it differs, logging each resource that changed; false if
/// the VM refused it (its grant stays as it was).
fn regrant(
    vm: &mut ManagedVm,
    next: PerResource<f64>,
    hold: PerResource<f64>,
    reason: &str,
    changes: &mut Vec<GrantChange>,
) -> bool {
    let (before, held) = (vm.grant, vm.hold);
    if next == before && hold == held {
        return true;
    }
    if let Err(e) = vm.set_grant(next, hold) {
        tracing::warn!("host: {e}");
        return false;
    }
    let moved = |r: Resource| next[r] != before[r] || hold[r] != held[r];
    for r in Resource::ALL.into_iter().filter(|&r| moved(r)) {
        let reason = if hold[r] > vm.record.spans[r].floor {
            format!("{reason}, held: slack lent ahead of a rise")
        } else {
            reason.to_string()
        };
        changes.push(GrantChange {
            vm: vm.record.id.clone(),
            resource: r.name(),
            class: vm.record.class,
            want: vm.want[r].unwrap_or(before[r]),
            from: before[r],
            to: next[r],
            hold: hold[r],
            reason,
        });
    }
    true
}

/// The pool a request claims a warm VM of (`POST /vms {"from_pool": NAME}` and nothing else).
fn warm_claim(request: &HostRequest) -> Option<String> {
    let HostRequest::CreateVm(body) = request else {
        return None;
    };
    let req = VmRequest::parse(body).ok()?;
    match req.config() {
        Ok(None) => req.from_pool,
        _ => None,
    }
}

/// `prescient host`: binds the API, adopts the recorded VMs and runs the pool.
pub fn run(args: &HostArgs) -> Result<(), HostError> {
    let mut supervisor = Supervisor::new(args)?;
    let _api = api::start(&args.api_sock, supervisor.answer())?;
    tracing::info!(
        "host: serving {} with {} VMs found",
        args.api_sock.display(),
        supervisor.vms.len()
    );
    supervisor.run();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bare_pool_claim_is_served_at_the_desk() {
        let create = |body: &str| HostRequest::CreateVm(body.as_bytes().to_vec());
        assert_eq!(
            warm_claim(&create(r#"{"from_pool": "fn"}"#)),
            Some("fn".into())
        );
        assert_eq!(
            warm_claim(&create(r#"{"id": "a", "from_pool": "fn"}"#)),
            Some("fn".into())
        );
        // The loop answers the rest, with its errors.
        assert_eq!(
            warm_claim(&create(r#"{"from_pool": "fn", "config": {}}"#)),
            None
        );
        assert_eq!(warm_claim(&create(r#"{"config": {}}"#)), None);
        assert_eq!(warm_claim(&create("{not json")), None);
        assert_eq!(warm_claim(&HostRequest::ListVms), None);
    }
}
