//! Where keypool's keys live: their names under the prefix and, in a Redis Cluster, their
//! slots.
//!
//! A script's keys must share a slot, and keys that share a slot share a master. So in a
//! cluster each key carries a hash tag that groups it with exactly the keys some call touches
//! with it, and no more:
//! - **A gateway's keys** (its rate-limit windows `gw:<g>:…`, its and its callers' budgets
//!   `budget:gw:<g>:…` and `budget:caller:<g>:…`, its token quota `quota:<g>`) are tagged with
//!   the gateway, `{<prefix>:gw:<g>}`: an admission or a budget hold touches one gateway's.
//! - **Keys always used alone** (pins `pin:…`, an upstream key's USD budget `budget:key:…`)
//!   are each their own tag, `{<prefix><name>}`.
//! - **The pool's keys** (the upstream keys' windows `key:…`, sessions, the replicas' table)
//!   keep the one tag `{<prefix>}` (the prefix's own `:` at its end, if any, is not doubled
//!   in the others): a pick chooses among any of the pool's keys in one script.
//!
//! So gateways, pins and key budgets spread over the masters by hash, and the pool's picks stay
//! on one (with `redis.lease`, one script per many calls). Outside a cluster a key is the
//! prefix and its name, as it always was.

/// How key names become Redis keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Layout {
    /// One server or a Sentinel-watched master: `<prefix><name>`.
    Plain(String),
    /// A Redis Cluster: the prefix (braces taken out) as the tag's start.
    Cluster(String),
}

/// Which keys a key shares its slot with in a cluster.
#[derive(Debug, PartialEq, Eq)]
enum Group<'a> {
    /// The pool's: one slot for all of them.
    Pool,
    /// A gateway's keys, by its name.
    Gateway(&'a str),
    /// None: the key is only ever used alone.
    Alone,
}

fn group(name: &str) -> Group<'_> {
    let gateway = ["gw:", "budget:gw:", "budget:caller:", "quota:"]
        .iter()
        .find_map(|p| name.strip_prefix(p));
    if let Some(rest) = gateway {
        // gateway names are `[a-z0-9-]`: the name ends at the first `:`
        return Group::Gateway(rest.split(':').next().unwrap_or(rest));
    }
    if name.starts_with("pin:") || name.starts_with("budget:key:") {
        return Group::Alone;
    }
    Group::Pool
}

impl Layout {
    /// The layout for `prefix`; in a cluster the tag is never empty (that would be no tag).
    pub(super) fn new(prefix: &str, cluster: bool) -> Self {
        if !cluster {
            return Self::Plain(prefix.to_owned());
        }
        // braces of its own would end the tag early
        let tag: String = prefix.chars().filter(|c| !matches!(c, '{' | '}')).collect();
        Self::Cluster(if tag.is_empty() {
            "keypool".to_owned()
        } else {
            tag
        })
    }

    /// The Redis key of `name`.
    pub(super) fn key(&self, name: &str) -> String {
        match self {
            Self::Plain(prefix) => format!("{prefix}{name}"),
            Self::Cluster(tag) => {
                let stem = tag.trim_end_matches(':');
                match group(name) {
                    Group::Pool => format!("{{{tag}}}{name}"),
                    Group::Gateway(g) => format!("{{{stem}:gw:{g}}}{name}"),
                    // a `}` in the name ends the tag early: still one slot for that name
                    Group::Alone => format!("{{{stem}:{name}}}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_cluster_names_are_prefixed_as_they_always_were() {
        let l = Layout::new("kp:", false);
        for name in ["gw:a:60/m", "key:k1:req", "pin:resp_1", "replicas"] {
            assert_eq!(l.key(name), format!("kp:{name}"));
        }
    }

    #[test]
    fn in_a_cluster_a_gateways_keys_share_its_tag_and_nothing_else_does() {
        let l = Layout::new("{kp}:", true);
        let gw = "{kp:gw:team-a}";
        for name in [
            "gw:team-a:60/m",
            "gw:team-a:60/m:secret-hash",
            "budget:gw:team-a:day:2026-12-06",
            "budget:caller:team-a:alice:day:2026-12-06",
            "quota:team-a",
        ] {
            assert_eq!(l.key(name), format!("{gw}{name}"), "{name}");
        }
        assert_eq!(l.key("gw:team-b:60/m"), "{kp:gw:team-b}gw:team-b:60/m");
        assert_eq!(l.key("key:k1:req"), "{kp:}key:k1:req");
        assert_eq!(l.key("aff:s1"), "{kp:}aff:s1");
        assert_eq!(l.key("pin:resp_1"), "{kp:pin:resp_1}");
        assert_eq!(
            l.key("budget:key:k1:month:2026-12"),
            "{kp:budget:key:k1:month:2026-12}"
        );
        assert_eq!(Layout::new("{}", true).key("x"), "{keypool}x");
    }
}
