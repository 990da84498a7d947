//! The routing index: which routes a message reaches, from its routing key and properties.
//!
//! One index per source topic holds every route's filters; matching a message costs in
//! proportion to the key's length and the routes it reaches, not to the routes there are.
//! MQTT Topic Filters and AMQP topic binding keys live in tries of levels (words), with one
//! child for the single-level wildcard and one for the multi-level one; exact keys in a hash
//! map; fanout routes in a list; headers filters (rare) are checked one by one.
//!
//! Pure and synchronous: the host's router (`host::router`) keeps one per source it reads.

use std::collections::HashMap;
use std::hash::Hash;

/// A route's filter, as the ABI's `routing.filter` says (and as a durable route's are
/// stored, in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Filter {
    /// MQTT Topic Filter: `/` levels, `+`, trailing `#`; `$` keys only by literal first levels.
    Mqtt(String),
    /// AMQP topic binding key: `.` words, `*` one word, `#` any number of words.
    AmqpTopic(String),
    /// Equal routing keys.
    Exact(String),
    /// Every message.
    All,
    /// Message properties: all or any of `args` (an empty value matches any value).
    Headers {
        match_all: bool,
        args: Vec<(String, String)>,
    },
}

/// Why a filter cannot be indexed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("invalid MQTT Topic Filter {0:?}: `#` only as the last level, `+` and `#` alone in their level, not empty")]
    Mqtt(String),
    #[error("invalid AMQP binding key {0:?}: `*` and `#` alone in their word")]
    AmqpTopic(String),
    #[error("a headers filter needs at least one argument")]
    Headers,
}

/// The kinds of trie: separator, single-level and multi-level wildcards, `$` rule.
#[derive(Debug, Clone, Copy)]
struct Syntax {
    separator: char,
    one: &'static str,
    many: &'static str,
    /// MQTT §4.7.2: a key whose first level starts with `$` is not matched by a filter
    /// whose first level is a wildcard.
    dollar_rule: bool,
    /// MQTT: `#` only last.
    many_last: bool,
}

const MQTT: Syntax = Syntax {
    separator: '/',
    one: "+",
    many: "#",
    dollar_rule: true,
    many_last: true,
};

const AMQP: Syntax = Syntax {
    separator: '.',
    one: "*",
    many: "#",
    dollar_rule: false,
    many_last: false,
};

impl Filter {
    /// Checks the filter's syntax.
    pub fn validate(&self) -> Result<(), FilterError> {
        match self {
            Filter::Mqtt(f) => {
                if f.is_empty() || f.contains('\0') || !valid_levels(f, MQTT) {
                    return Err(FilterError::Mqtt(f.clone()));
                }
            }
            Filter::AmqpTopic(f) => {
                if !valid_levels(f, AMQP) {
                    return Err(FilterError::AmqpTopic(f.clone()));
                }
            }
            Filter::Headers { args, .. } if args.is_empty() => return Err(FilterError::Headers),
            Filter::Exact(_) | Filter::All | Filter::Headers { .. } => {}
        }
        Ok(())
    }
}

fn valid_levels(filter: &str, syntax: Syntax) -> bool {
    let levels: Vec<&str> = filter.split(syntax.separator).collect();
    levels.iter().enumerate().all(|(i, level)| {
        let wildcard_inside = |w: &str| level.contains(w) && *level != w;
        if wildcard_inside(syntax.one) || wildcard_inside(syntax.many) {
            return false;
        }
        !(syntax.many_last && *level == syntax.many && i + 1 != levels.len())
    })
}

/// One level of a trie: the routes whose filter ends here, and the next levels.
#[derive(Debug)]
struct Node<R> {
    routes: Vec<R>,
    children: HashMap<Box<str>, Node<R>>,
    one: Option<Box<Node<R>>>,
    many: Option<Box<Node<R>>>,
}

impl<R> Default for Node<R> {
    fn default() -> Self {
        Node {
            routes: Vec::new(),
            children: HashMap::new(),
            one: None,
            many: None,
        }
    }
}

impl<R: Copy + PartialEq> Node<R> {
    fn is_empty(&self) -> bool {
        self.routes.is_empty()
            && self.children.is_empty()
            && self.one.is_none()
            && self.many.is_none()
    }

    fn insert(&mut self, levels: &[&str], syntax: Syntax, route: R) -> bool {
        let Some((head, rest)) = levels.split_first() else {
            if self.routes.contains(&route) {
                return false;
            }
            self.routes.push(route);
            return true;
        };
        let next = if *head == syntax.one {
            self.one.get_or_insert_with(Box::default)
        } else if *head == syntax.many {
            self.many.get_or_insert_with(Box::default)
        } else {
            self.children.entry((*head).into()).or_default()
        };
        next.insert(rest, syntax, route)
    }

    /// Removes `route` at the end of `levels`; empty nodes on the way are dropped.
    fn remove(&mut self, levels: &[&str], syntax: Syntax, route: R) -> bool {
        let Some((head, rest)) = levels.split_first() else {
            let before = self.routes.len();
            self.routes.retain(|r| *r != route);
            return self.routes.len() != before;
        };
        let prune = |slot: &mut Option<Box<Node<R>>>| {
            let Some(node) = slot else { return false };
            let removed = node.remove(rest, syntax, route);
            if node.is_empty() {
                *slot = None;
            }
            removed
        };
        if *head == syntax.one {
            prune(&mut self.one)
        } else if *head == syntax.many {
            prune(&mut self.many)
        } else {
            let Some(node) = self.children.get_mut(*head) else {
                return false;
            };
            let removed = node.remove(rest, syntax, route);
            if node.is_empty() {
                self.children.remove(*head);
            }
            removed
        }
    }

    /// Adds the routes of every filter below this node that matches `levels`. `guard`: the
    /// wildcards of this node may not match (MQTT's `$` rule at the first level).
    fn collect(&self, levels: &[&str], guard: bool, out: &mut Vec<R>) {
        if let Some(many) = self.many.as_deref().filter(|_| !guard) {
            out.extend_from_slice(&many.routes);
            if !(many.children.is_empty() && many.one.is_none() && many.many.is_none()) {
                // A `#` inside a key (AMQP): it takes any number of words, then the rest.
                for skip in 0..=levels.len() {
                    many.collect_after_many(&levels[skip..], out);
                }
            }
        }
        match levels.split_first() {
            None => out.extend_from_slice(&self.routes),
            Some((head, rest)) => {
                if let Some(child) = self.children.get(*head) {
                    child.collect(rest, false, out);
                }
                if let Some(one) = self.one.as_deref().filter(|_| !guard) {
                    one.collect(rest, false, out);
                }
            }
        }
    }

    /// Like `collect`, but this node's own routes were already taken for every skip.
    fn collect_after_many(&self, levels: &[&str], out: &mut Vec<R>) {
        let Some((head, rest)) = levels.split_first() else {
            if let Some(many) = &self.many {
                out.extend_from_slice(&many.routes);
            }
            return;
        };
        if let Some(child) = self.children.get(*head) {
            child.collect(rest, false, out);
        }
        if let Some(one) = &self.one {
            one.collect(rest, false, out);
        }
        if let Some(many) = &self.many {
            many.collect(levels, false, out);
        }
    }
}

/// A headers filter of a route: `x-match = all` or not, and its arguments.
type HeadersEntry<R> = (bool, Vec<(String, String)>, R);

/// Every route's filters of one source.
#[derive(Debug)]
pub struct Index<R> {
    mqtt: Node<R>,
    amqp: Node<R>,
    exact: HashMap<String, Vec<R>>,
    all: Vec<R>,
    headers: Vec<HeadersEntry<R>>,
    filters: usize,
}

impl<R> Default for Index<R> {
    fn default() -> Self {
        Index {
            mqtt: Node::default(),
            amqp: Node::default(),
            exact: HashMap::new(),
            all: Vec::new(),
            headers: Vec::new(),
            filters: 0,
        }
    }
}

impl<R: Copy + Ord + Hash> Index<R> {
    /// Binds `filter` to `route`; `false` if it was already bound (nothing changes).
    pub fn insert(&mut self, filter: &Filter, route: R) -> Result<bool, FilterError> {
        filter.validate()?;
        let added = match filter {
            Filter::Mqtt(f) => self.mqtt.insert(&levels(f, MQTT), MQTT, route),
            Filter::AmqpTopic(f) => self.amqp.insert(&levels(f, AMQP), AMQP, route),
            Filter::Exact(key) => add(self.exact.entry(key.clone()).or_default(), route),
            Filter::All => add(&mut self.all, route),
            Filter::Headers { match_all, args } => {
                let entry = (*match_all, args.clone(), route);
                if self.headers.contains(&entry) {
                    false
                } else {
                    self.headers.push(entry);
                    true
                }
            }
        };
        self.filters += usize::from(added);
        Ok(added)
    }

    /// Unbinds `filter` from `route`; `false` if it was not bound.
    pub fn remove(&mut self, filter: &Filter, route: R) -> bool {
        let removed = match filter {
            Filter::Mqtt(f) => self.mqtt.remove(&levels(f, MQTT), MQTT, route),
            Filter::AmqpTopic(f) => self.amqp.remove(&levels(f, AMQP), AMQP, route),
            Filter::Exact(key) => {
                let removed = self.exact.get_mut(key).is_some_and(|v| take(v, route));
                if self.exact.get(key).is_some_and(Vec::is_empty) {
                    self.exact.remove(key);
                }
                removed
            }
            Filter::All => take(&mut self.all, route),
            Filter::Headers { match_all, args } => {
                let before = self.headers.len();
                self.headers
                    .retain(|(m, a, r)| !(m == match_all && a == args && *r == route));
                self.headers.len() != before
            }
        };
        self.filters -= usize::from(removed);
        removed
    }

    /// Whether a headers filter is bound (only then do properties matter).
    pub fn has_headers(&self) -> bool {
        !self.headers.is_empty()
    }

    /// Number of bound filters.
    pub fn len(&self) -> usize {
        self.filters
    }

    pub fn is_empty(&self) -> bool {
        self.filters == 0
    }

    /// The routes a message reaches, each once, in ascending order, into `out` (cleared).
    pub fn matches(&self, key: &str, properties: &[(&str, &str)], out: &mut Vec<R>) {
        out.clear();
        if !self.mqtt.is_empty() {
            let levels = levels(key, MQTT);
            self.mqtt
                .collect(&levels, MQTT.dollar_rule && key.starts_with('$'), out);
        }
        if !self.amqp.is_empty() {
            self.amqp.collect(&levels(key, AMQP), false, out);
        }
        if let Some(routes) = self.exact.get(key) {
            out.extend_from_slice(routes);
        }
        out.extend_from_slice(&self.all);
        for (match_all, args, route) in &self.headers {
            let hit = |(k, v): &(String, String)| {
                properties
                    .iter()
                    .any(|(pk, pv)| pk == k && (v.is_empty() || pv == v))
            };
            let matched = if *match_all {
                args.iter().all(hit)
            } else {
                args.iter().any(hit)
            };
            if matched {
                out.push(*route);
            }
        }
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }
}

fn levels(key: &str, syntax: Syntax) -> Vec<&str> {
    key.split(syntax.separator).collect()
}

fn add<R: PartialEq>(routes: &mut Vec<R>, route: R) -> bool {
    if routes.contains(&route) {
        return false;
    }
    routes.push(route);
    true
}

fn take<R: PartialEq>(routes: &mut Vec<R>, route: R) -> bool {
    let before = routes.len();
    routes.retain(|r| *r != route);
    routes.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mqtt(f: &str) -> Filter {
        Filter::Mqtt(f.into())
    }

    fn amqp(f: &str) -> Filter {
        Filter::AmqpTopic(f.into())
    }

    fn hits(index: &Index<u32>, key: &str) -> Vec<u32> {
        let mut out = Vec::new();
        index.matches(key, &[], &mut out);
        out
    }

    fn index(filters: &[(Filter, u32)]) -> Index<u32> {
        let mut index = Index::default();
        for (f, r) in filters {
            index.insert(f, *r).expect("valid filter");
        }
        index
    }

    #[test]
    fn mqtt_wildcards_match_as_section_4_7_says() {
        let ix = index(&[
            (mqtt("sport/tennis/player1"), 1),
            (mqtt("sport/tennis/player1/#"), 2),
            (mqtt("sport/#"), 3),
            (mqtt("sport/+/player1"), 4),
            (mqtt("+/+"), 5),
            (mqtt("/+"), 6),
            (mqtt("#"), 7),
            (mqtt("+"), 8),
        ]);
        assert_eq!(hits(&ix, "sport/tennis/player1"), vec![1, 2, 3, 4, 7]);
        assert_eq!(hits(&ix, "sport/tennis/player1/ranking"), vec![2, 3, 7]);
        // `#` includes the parent level (§4.7.1.2), and `sport/` has an empty second level.
        assert_eq!(hits(&ix, "sport"), vec![3, 7, 8]);
        assert_eq!(hits(&ix, "sport/"), vec![3, 5, 7]);
        assert_eq!(hits(&ix, "/finance"), vec![5, 6, 7]);
        assert_eq!(hits(&ix, "other/tennis/player1"), vec![7]);
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        let ix = index(&[
            (mqtt("#"), 1),
            (mqtt("+/monitor/Clients"), 2),
            (mqtt("$SYS/#"), 3),
            (mqtt("$SYS/monitor/+"), 4),
        ]);
        assert_eq!(hits(&ix, "$SYS/monitor/Clients"), vec![3, 4]);
        assert_eq!(hits(&ix, "SYS/monitor/Clients"), vec![1, 2]);
    }

    #[test]
    fn a_route_with_overlapping_filters_is_reached_once() {
        let mut ix = index(&[(mqtt("a/+/c"), 1), (mqtt("a/#"), 1), (mqtt("a/b/c"), 1)]);
        ix.insert(&mqtt("a/b/c"), 2).expect("valid");
        assert_eq!(hits(&ix, "a/b/c"), vec![1, 2]);
        assert_eq!(ix.len(), 4);
        // Binding the same filter again changes nothing.
        assert_eq!(ix.insert(&mqtt("a/#"), 1), Ok(false));
        assert_eq!(ix.len(), 4);
    }

    #[test]
    fn unbinding_removes_exactly_one_filter_and_prunes() {
        let mut ix = index(&[(mqtt("a/+/c"), 1), (mqtt("a/#"), 1), (mqtt("a/b/c"), 2)]);
        assert!(ix.remove(&mqtt("a/#"), 1));
        assert!(!ix.remove(&mqtt("a/#"), 1));
        assert!(!ix.remove(&mqtt("a/b/c"), 1), "another route's filter");
        assert_eq!(hits(&ix, "a/b/c"), vec![1, 2]);
        assert_eq!(hits(&ix, "a/b"), Vec::<u32>::new());
        assert!(ix.remove(&mqtt("a/+/c"), 1));
        assert!(ix.remove(&mqtt("a/b/c"), 2));
        assert!(ix.is_empty());
        assert!(ix.mqtt.is_empty(), "empty levels are pruned");
    }

    #[test]
    fn a_fleet_costs_its_matches() {
        let mut ix = Index::default();
        for id in 0..10_000u32 {
            ix.insert(&mqtt(&format!("dev/{id}/cmd")), id)
                .expect("valid");
        }
        ix.insert(&mqtt("dev/+/tele"), 10_000).expect("valid");
        assert_eq!(hits(&ix, "dev/4711/cmd"), vec![4711]);
        assert_eq!(hits(&ix, "dev/4711/tele"), vec![10_000]);
        assert_eq!(hits(&ix, "dev/4711/other"), Vec::<u32>::new());
    }

    #[test]
    fn invalid_filters_are_refused() {
        for f in ["", "a/#/b", "a#", "a/b+", "+a", "a\0b"] {
            assert!(
                Index::<u32>::default().insert(&mqtt(f), 1).is_err(),
                "{f:?}"
            );
        }
        assert!(Index::<u32>::default().insert(&amqp("a.b*"), 1).is_err());
        let no_args = Filter::Headers {
            match_all: true,
            args: vec![],
        };
        assert_eq!(
            Index::<u32>::default().insert(&no_args, 1),
            Err(FilterError::Headers)
        );
    }

    #[test]
    fn amqp_topic_bindings_match_as_rabbitmq_does() {
        let ix = index(&[
            (amqp("*.orange.*"), 1),
            (amqp("*.*.rabbit"), 2),
            (amqp("lazy.#"), 3),
            (amqp("#"), 4),
            (amqp("a.#.z"), 5),
            (amqp("#.end"), 6),
        ]);
        assert_eq!(hits(&ix, "quick.orange.rabbit"), vec![1, 2, 4]);
        assert_eq!(hits(&ix, "lazy.orange.elephant"), vec![1, 3, 4]);
        assert_eq!(hits(&ix, "lazy"), vec![3, 4]);
        assert_eq!(hits(&ix, "lazy.pink.rabbit"), vec![2, 3, 4]);
        assert_eq!(hits(&ix, "quick.orange.male.rabbit"), vec![4]);
        assert_eq!(hits(&ix, "a.z"), vec![4, 5]);
        assert_eq!(hits(&ix, "a.b.c.z"), vec![4, 5]);
        assert_eq!(hits(&ix, "end"), vec![4, 6]);
        assert_eq!(hits(&ix, "x.y.end"), vec![4, 6]);
        // `$` means nothing special to AMQP.
        assert_eq!(hits(&ix, "$x.orange.y"), vec![1, 4]);
    }

    #[test]
    fn direct_fanout_and_headers() {
        let headers = |match_all, args: &[(&str, &str)]| Filter::Headers {
            match_all,
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let ix = index(&[
            (Filter::Exact("orders".into()), 1),
            (Filter::All, 2),
            (headers(true, &[("format", "pdf"), ("type", "report")]), 3),
            (headers(false, &[("format", "pdf"), ("type", "log")]), 4),
            (headers(true, &[("format", "")]), 5),
        ]);
        let mut out = Vec::new();
        ix.matches("orders", &[("format", "pdf"), ("type", "report")], &mut out);
        assert_eq!(out, vec![1, 2, 3, 4, 5]);
        ix.matches("other", &[("format", "zip"), ("type", "log")], &mut out);
        assert_eq!(out, vec![2, 4, 5]);
        ix.matches("other", &[], &mut out);
        assert_eq!(out, vec![2]);
    }
}
