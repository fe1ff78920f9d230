//! [`PoolHandle::pick`]: one pass over the published view (the keys the caller may use, not
//! yet tried, allowed for the model, usable now), ranked by the policy, then reserved: in the
//! shared windows first when replicas share them, then by the key's actor when it has a budget.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keypool_config::{LbPolicy, UpstreamKey};
use tokio::time::Instant;

use super::slice::TokenSlice;
use super::{Lease, PoolHandle, PoolView, SharedTokens};
use crate::SharedState as _;
use crate::messages::{BusyCause, NoKey, Refusal, Reserve};
use crate::select::{Candidate, rank};

/// What a request asks of the pool for one attempt.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The request's model (JSON `model`, multipart `model`, or the path).
    pub model: Arc<str>,
    /// The request path (`/v1/audio/transcriptions`), which allow/deny entries may name.
    pub path: Arc<str>,
    /// Which keys may serve the caller (its gateway's rules).
    pub access: KeyAccess,
    /// The request carries a credential of the caller's own to pass on: only then may
    /// `sk: asis` keys serve it (they forward it instead of a key).
    pub passthrough: bool,
    /// Tokens reserved against tpm until the real usage is known.
    pub est_tokens: u64,
    /// Keys already tried by this request ([`Lease::key_id`]s), skipped.
    pub exclude: Vec<u64>,
    /// Only this key may serve (a Responses API response lives with the key that created
    /// it); its allow/deny rules are not asked again (the request names an id, not a model).
    pub only: Option<Arc<str>>,
    /// The request's session (`affinity:`): it keeps its key while that key can serve.
    pub session: Option<crate::SessionReq>,
}

/// Which keys a caller may use, by its gateway's auth rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAccess {
    /// Every key: the caller authenticated with its gateway's own credential, or the gateway
    /// is open.
    All,
    /// The `default` gateway's client-token rules: keys whose own `authorization` list admits
    /// this token; `None` is a caller with no valid token, whom only `noauth` keys serve.
    Token(Option<Arc<str>>),
}

impl KeyAccess {
    pub fn allows(&self, key: &UpstreamKey) -> bool {
        match self {
            Self::All => true,
            Self::Token(t) => key.allows_caller(t.as_deref()),
        }
    }
}

/// Earliest time some key frees up, and why it is busy until then.
#[derive(Default)]
struct Earliest(Option<(Instant, BusyCause)>);

impl Earliest {
    fn offer(&mut self, until: Instant, cause: BusyCause) {
        if self.0.is_none_or(|(t, _)| until < t) {
            self.0 = Some((until, cause));
        }
    }
}

impl PoolHandle {
    /// Picks a key for one attempt and reserves its budget.
    pub async fn pick(&self, pick: &Pick) -> Result<Lease, NoKey> {
        let view = self.view();
        let now = Instant::now();
        let Gathered {
            mut cands,
            mut disabled,
            mut earliest,
        } = match gather(&view, pick, now, false) {
            // no key speaks the request's API for this model: one that can by translation
            Err(NoKey::NoneServes) => gather(&view, pick, now, true)?,
            other => other?,
        };
        rank(view.policy, &mut cands);
        let named = self.session_first(pick, &view, &mut cands).await;
        let first_lease = self.next_lease.fetch_add(1, Ordering::Relaxed);
        // across replicas: choose and reserve in the shared windows, in one round trip, so the
        // replicas rank on the same counts (least-used) and never exceed a key's rpm together
        let mut affinity = None;
        let (chosen, share_of, mut shared_tokens) = match &self.shared {
            Some(shared) if !cands.is_empty() => {
                match self
                    .shared_choice(shared, &view, &cands, pick, first_lease)
                    .await
                {
                    SharedPick::Chosen(c, tokens, stick) => {
                        affinity = stick;
                        (Some(vec![c]), 1, tokens)
                    }
                    SharedPick::Busy(until) => {
                        earliest.offer(until, BusyCause::Budget);
                        (Some(Vec::new()), 1, None)
                    }
                    SharedPick::Failed if shared.fail_closed() => {
                        return Err(NoKey::SharedUnavailable);
                    }
                    SharedPick::Failed => (None, shared.replicas_hint(), None),
                }
            }
            _ => (None, 1, None),
        };
        for (n, c) in chosen.as_deref().unwrap_or(&cands).iter().enumerate() {
            let k = &view.keys[c.order];
            let lease_id = if n == 0 {
                first_lease
            } else {
                self.next_lease.fetch_add(1, Ordering::Relaxed)
            };
            let mut lease = || {
                k.tally.leased();
                Lease {
                    key_id: k.id,
                    key: k.key.clone(),
                    addr: k.addr.clone(),
                    tally: k.tally.clone(),
                    id: lease_id,
                    settled: false,
                    started: Instant::now(),
                    shared_tokens: shared_tokens.take(),
                    affinity,
                }
            };
            // without a budget only health can refuse, and the gauge shows it, unless an
            // outcome (a 429's cooldown, say) still waits in the actor's mailbox: then the
            // actor answers, after that outcome, so a client's next request after a 429 never
            // reaches the key it was just told is cooling down
            if k.key.rpm.is_none() && k.key.tpm.is_none() && k.tally.quiet() {
                k.tally.record();
                return Ok(self.remember(pick, named.as_deref(), lease()).await);
            }
            let reserve = Reserve {
                lease_id,
                est_tokens: pick.est_tokens,
                share_of,
            };
            match k.addr.send(reserve).await {
                Ok(Ok(())) => return Ok(self.remember(pick, named.as_deref(), lease()).await),
                Ok(Err(Refusal::Budget { until })) => earliest.offer(until, BusyCause::Budget),
                Ok(Err(Refusal::Cooling { until })) => earliest.offer(until, BusyCause::Cooling),
                Ok(Err(Refusal::Disabled)) | Err(_) => disabled += 1,
            }
        }
        match earliest.0 {
            Some((until, cause)) => Err(NoKey::Busy { until, cause }),
            None if disabled > 0 => Err(NoKey::AllDisabled),
            None => Err(NoKey::NoneServes),
        }
    }
}

impl PoolHandle {
    /// With shared state: a call leased earlier (`redis.lease`) spent here without a round
    /// trip, or else the shared pick.
    async fn shared_choice(
        &self,
        shared: &Arc<dyn crate::SharedState>,
        view: &PoolView,
        cands: &[Candidate],
        pick: &Pick,
        lease_id: u64,
    ) -> SharedPick {
        let name = |c: &Candidate| &*view.keys[c.order].key.name;
        let mut asking = None;
        if let (Some(l), None) = (&self.leasing, &pick.session) {
            let est = pick.est_tokens;
            let spent = |l: &Arc<super::PickLeasing>| {
                // a key with `tpm`: its lease's token slice must hold this pick's estimate too
                let takes = |slice: &Option<Arc<TokenSlice>>| {
                    slice.as_ref().is_none_or(|slice| slice.take(est))
                };
                let s = l.spend_where(cands, name, Instant::now(), takes)?;
                if l.time_to_ask_ahead(s.left) {
                    ask_ahead(shared, l, view, cands);
                }
                let tokens = s.meta.map(|slice| {
                    let hold = slice.hold(est);
                    if s.left == 0 {
                        slice.close();
                    }
                    SharedTokens::Slice(hold)
                });
                Some(SharedPick::Chosen(s.on, tokens, None))
            };
            if let Some(chosen) = spent(l) {
                return chosen;
            }
            // one lease asked for at a time (for all keys: under one name), the picks
            // meanwhile wait for it once, then spend from it or reserve a single call
            match l.turn("").await {
                keypool_shared::Turn::Ask(a) => asking = Some((l, a)),
                keypool_shared::Turn::Landed => {
                    if let Some(chosen) = spent(l) {
                        return chosen;
                    }
                }
            }
        }
        let id = format!("{}-{lease_id}", keypool_shared::process_id());
        let leasing = asking.as_ref().map(|(l, _)| *l);
        shared_pick(shared, view, cands, pick, id, Instant::now(), leasing).await
    }

    /// Without shared state: the key the pick's session names (if any) goes first among the
    /// ranked candidates (the shared pick does that in its script). Answers that key's name.
    async fn session_first(
        &self,
        pick: &Pick,
        view: &PoolView,
        cands: &mut [Candidate],
    ) -> Option<String> {
        let (Some(s), None) = (&pick.session, &self.shared) else {
            return None;
        };
        let name = self.sessions.pinned(&s.key).await.ok().flatten()?;
        if let Some(i) = cands
            .iter()
            .position(|c| *view.keys[c.order].key.name == *name)
        {
            cands[..=i].rotate_right(1);
        }
        Some(name)
    }

    /// Without shared state: the session (if any) keeps the leased key from now on, and the
    /// lease says whether it was the session's.
    async fn remember(&self, pick: &Pick, named: Option<&str>, mut lease: Lease) -> Lease {
        if let (Some(s), None) = (&pick.session, &self.shared) {
            let _ = self.sessions.pin(&s.key, &lease.key.name, s.ttl).await;
            lease.affinity = Some(match named {
                Some(n) if n == &*lease.key.name => crate::Stick::Hit,
                Some(_) => crate::Stick::Moved,
                None => crate::Stick::Miss,
            });
        }
        lease
    }
}

/// The keys that may serve a pick and are usable now, with what the others say.
struct Gathered {
    cands: Vec<Candidate>,
    /// Keys that serve the pick but are disabled.
    disabled: usize,
    /// When the first cooling key comes back.
    earliest: Earliest,
}

/// One pass over the view: the keys allowed for the pick, split into candidates (usable now),
/// disabled and cooling ones. `NoneServes` when no key serves it at all.
/// With `translated`, the keys that answer the request's API by translation instead of natively.
fn gather(view: &PoolView, pick: &Pick, now: Instant, translated: bool) -> Result<Gathered, NoKey> {
    let now_ms = now.saturating_duration_since(view.epoch).as_millis() as u64;
    let mut serving = 0usize;
    let mut out = Gathered {
        cands: Vec::with_capacity(view.keys.len()),
        disabled: 0,
        earliest: Earliest::default(),
    };
    // Anthropic keys answer the Messages API, OpenAI keys the Responses API
    let surface = keypool_types::Surface::of_path(&pick.path);
    for (order, k) in view.keys.iter().enumerate() {
        let allowed = match &pick.only {
            Some(only) => k.key.name == *only,
            None => k.key.allows_model(&pick.model, &pick.path),
        };
        let speaks = if translated {
            k.key.kind.translates(surface, &pick.path)
        } else {
            k.key.kind.serves(surface)
        };
        if pick.exclude.contains(&k.id)
            || !speaks
            || !allowed
            || (k.key.passthrough_auth && !pick.passthrough)
            || !pick.access.allows(&k.key)
        {
            continue;
        }
        serving += 1;
        let available_at = k.gauge.available_at_ms.load(Ordering::Relaxed);
        if available_at == u64::MAX {
            out.disabled += 1;
        } else if available_at > now_ms {
            let until = view.epoch + Duration::from_millis(available_at);
            out.earliest.offer(until, BusyCause::Cooling);
        } else {
            let pending = u32::try_from(k.tally.pending()).unwrap_or(u32::MAX);
            let window_requests = k
                .gauge
                .window_requests
                .load(Ordering::Relaxed)
                .saturating_add(pending);
            out.cands.push(Candidate {
                order,
                window_requests,
                in_flight: k.tally.in_flight(),
                // a key unused for a whole window is measured again (its last time may have
                // been a cold connection's, or a bad minute's)
                ttfb_ms: if window_requests == 0 {
                    0
                } else {
                    k.tally.ttfb_ms()
                },
            });
        }
    }
    if serving == 0 {
        return Err(NoKey::NoneServes);
    }
    Ok(out)
}

/// What the shared state chose among the candidates.
enum SharedPick {
    /// This candidate, its call counted (and its tokens reserved, when it has a tpm); for a
    /// session, whether it kept its key.
    Chosen(Candidate, Option<SharedTokens>, Option<crate::Stick>),
    /// None has room before this.
    Busy(Instant),
    /// The shared state is unavailable (already counted and logged).
    Failed,
}

/// Chooses and reserves among `cands` in the shared windows, in one round trip; with
/// `leasing` (this pick holds the turn to ask) a lease of several calls, kept for later picks.
async fn shared_pick(
    shared: &Arc<dyn crate::SharedState>,
    view: &PoolView,
    cands: &[Candidate],
    pick: &Pick,
    id: String,
    now: Instant,
    leasing: Option<&Arc<super::PickLeasing>>,
) -> SharedPick {
    let ordered = script_order(view, cands.to_vec());
    let windows: Vec<crate::WindowReq> = ordered
        .iter()
        .map(|c| calls_window(&view.keys[c.order].key))
        .collect();
    let tokens: Vec<Option<crate::TokenReq>> = ordered
        .iter()
        .map(|c| {
            let key = &view.keys[c.order].key;
            key.tpm.map(|limit| crate::TokenReq {
                key: format!("key:{}:tok", key.name),
                limit,
                cost: pick.est_tokens,
            })
        })
        .collect();
    let least_used = view.policy == LbPolicy::LeastUsed;
    let asked = Instant::now();
    let one = crate::Granted {
        calls: 1,
        tokens: 0,
    };
    let picked = match (&pick.session, leasing) {
        (None, Some(l)) => shared
            .pick_leasing(&windows, &tokens, least_used, &id, l.req, now)
            .await
            .map(|(p, granted)| (p, None, granted)),
        (None, None) => shared
            .pick_reserving(&windows, &tokens, least_used, &id, now)
            .await
            .map(|p| (p, None, one)),
        (Some(session), _) => shared
            .pick_in_session(&windows, &tokens, least_used, &id, session, now)
            .await
            .map(|(p, stick)| (p, Some(stick), one)),
    };
    match picked {
        Ok((crate::Picked::Index(i), stick, granted)) => {
            let i = i.min(ordered.len() - 1);
            let mut in_slice = None;
            if let (Some(l), true) = (leasing, granted.calls > 1) {
                let name = view.keys[ordered[i].order].key.name.clone();
                let window = Box::new([windows[i].clone()]);
                // a key with `tpm`: the lease holds an estimate per call there too, this
                // pick's among them
                let slice = tokens[i]
                    .as_ref()
                    .filter(|_| granted.tokens > 0)
                    .map(|req| {
                        let req = crate::TokenReq {
                            cost: granted.tokens,
                            ..req.clone()
                        };
                        let each = granted.tokens / u64::from(granted.calls);
                        let until = asked + l.req.within;
                        let (slice, own) =
                            TokenSlice::open(shared.clone(), req, id.clone(), each, until);
                        in_slice = Some(SharedTokens::Slice(own));
                        slice
                    });
                l.keep(name, window, (id.clone(), granted.calls, asked), slice);
            }
            let reserved = in_slice.or_else(|| {
                tokens[i].clone().map(|req| SharedTokens::Each {
                    state: shared.clone(),
                    req,
                    id,
                })
            });
            SharedPick::Chosen(ordered[i], reserved, stick)
        }
        Ok((crate::Picked::Busy(free_in), _, _)) => SharedPick::Busy(Instant::now() + free_in),
        Err(e) => {
            shared.failed(&e);
            SharedPick::Failed
        }
    }
}

/// Candidates in the order the shared pick's script takes them: random and latency, the first
/// with room in their ranking; the others choose there by the shared counts, ties going to
/// config order.
fn script_order(view: &PoolView, mut cands: Vec<Candidate>) -> Vec<Candidate> {
    if !matches!(view.policy, LbPolicy::Random | LbPolicy::Latency) {
        cands.sort_by_key(|c| c.order);
    }
    cands
}

/// A key's calls window in the shared state (`u64::MAX`: unbudgeted, ranking only).
fn calls_window(key: &UpstreamKey) -> crate::WindowReq {
    crate::WindowReq {
        key: format!("key:{}:req", key.name),
        limit: key.rpm.map_or(u64::MAX, u64::from),
        per: crate::key::WINDOW,
    }
}

/// Asks for the next lease of picks in the background, among `cands`' keys without a token
/// window (their leases are calls only), unless an ask is under way: under steady traffic it
/// lands before the current lease is spent, so no pick waits for the script. The key it is
/// for is the one the script chooses now, as an in-line ask would; a busy answer or an
/// unavailable shared state keeps nothing (the next pick that finds no lease asks itself).
fn ask_ahead(
    shared: &Arc<dyn crate::SharedState>,
    l: &Arc<super::PickLeasing>,
    view: &PoolView,
    cands: &[Candidate],
) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let calls_only = cands
        .iter()
        .filter(|c| view.keys[c.order].key.tpm.is_none())
        .copied()
        .collect();
    let ordered = script_order(view, calls_only);
    if ordered.is_empty() {
        return;
    }
    let names: Vec<Arc<str>> = ordered
        .iter()
        .map(|c| view.keys[c.order].key.name.clone())
        .collect();
    let windows: Vec<crate::WindowReq> = ordered
        .iter()
        .map(|c| calls_window(&view.keys[c.order].key))
        .collect();
    let least_used = view.policy == LbPolicy::LeastUsed;
    let (shared, l) = (shared.clone(), l.clone());
    tokio::spawn(async move {
        let Some(_asking) = l.ask_ahead("") else {
            return;
        };
        let id = format!(
            "{}-ahead-{:016x}",
            keypool_shared::process_id(),
            fastrand::u64(..)
        );
        let asked = Instant::now();
        let tokens = vec![None; windows.len()];
        match shared
            .pick_leasing(&windows, &tokens, least_used, &id, l.req, asked)
            .await
        {
            Ok((crate::Picked::Index(i), granted)) => {
                let i = i.min(windows.len() - 1);
                let window = Box::new([windows[i].clone()]);
                l.keep_ahead(names[i].clone(), window, (id, granted.calls, asked), None);
            }
            Ok((crate::Picked::Busy(_), _)) => {}
            Err(e) => shared.background_failed(&e),
        }
    });
}
