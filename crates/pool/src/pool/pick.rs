//! [`PoolHandle::pick`]: one pass over the published view (the keys the caller may use, not
//! yet tried, allowed for the model, usable now), ranked by the policy, then reserved: in the
//! shared windows first when replicas share them, then by the key's actor when it has a budget.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keypool_config::UpstreamKey;
use tokio::time::Instant;

use super::shared_pick::{SharedPick, ask_ahead, shared_pick};
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
    /// trip, or else the shared pick. A session's pick spends only a lease of the key it keeps,
    /// as this replica last learned it from the pick script (within `lease_ms`).
    async fn shared_choice(
        &self,
        shared: &Arc<dyn crate::SharedState>,
        view: &PoolView,
        cands: &[Candidate],
        pick: &Pick,
        lease_id: u64,
    ) -> SharedPick {
        let mut asking = None;
        if let Some(l) = &self.leasing {
            if let Some(chosen) = self.spend_leased(shared, l, view, cands, pick).await {
                return chosen;
            }
            // one lease asked for at a time (for all keys: under one name), the picks
            // meanwhile wait for it once, then spend from it or reserve a single call
            match l.turn("").await {
                keypool_shared::Turn::Ask(a) => asking = Some((l, a)),
                keypool_shared::Turn::Landed => {
                    if let Some(chosen) = self.spend_leased(shared, l, view, cands, pick).await {
                        return chosen;
                    }
                }
            }
        }
        let id = format!("{}-{lease_id}", keypool_shared::process_id());
        let leasing = asking.as_ref().map(|(l, _)| *l);
        let chosen = shared_pick(shared, view, cands, pick, id, Instant::now(), leasing).await;
        // the key the script chose for a session: this replica's view of it for `lease_ms`
        if let (Some(l), Some(s), SharedPick::Chosen(c, ..)) =
            (&self.leasing, &pick.session, &chosen)
        {
            let name = &view.keys[c.order].key.name;
            let _ = self
                .sessions
                .pin(&s.key, name, l.req.within.min(s.ttl))
                .await;
        }
        chosen
    }

    /// A call of a key's lease held here, spent on the first of `cands` that has one (a
    /// session: only on the key it keeps, when this replica knows it). The pick that leaves a
    /// quarter of its lease asks for the next one ahead of need.
    async fn spend_leased(
        &self,
        shared: &Arc<dyn crate::SharedState>,
        l: &Arc<super::PickLeasing>,
        view: &PoolView,
        cands: &[Candidate],
        pick: &Pick,
    ) -> Option<SharedPick> {
        let name = |c: &Candidate| &*view.keys[c.order].key.name;
        let (among, stick) = match &pick.session {
            None => (cands, None),
            Some(s) => {
                let kept = self.sessions.pinned(&s.key).await.ok().flatten()?;
                let c = cands.iter().find(|c| name(c) == kept)?;
                (std::slice::from_ref(c), Some(crate::Stick::Hit))
            }
        };
        // a key with `tpm`: its lease's token slice must hold this pick's estimate too
        let est = pick.est_tokens;
        let held = std::cell::Cell::new(None);
        let takes = |slice: &Option<Arc<TokenSlice>>| match slice {
            None => true,
            Some(slice) => slice.take(est).map(|h| held.set(Some(h))).is_some(),
        };
        let s = l.spend_where(among, name, Instant::now(), takes)?;
        if l.time_to_ask_ahead(s.left) {
            ask_ahead(shared, l, view, (among, est));
        }
        if let (Some(slice), 0) = (&s.meta, s.left) {
            slice.close();
        }
        let tokens = held.into_inner().map(SharedTokens::Slice);
        Some(SharedPick::Chosen(s.on, tokens, stick))
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
