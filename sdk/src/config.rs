//! A plugin's config as the host passes it (`[plugins.config.<name>]`, TOML text): one
//! `key = integer` per line, `#` comments, `_` between digits. Every setting of the built-in
//! plugins is a bounded integer, so this is their one parser; a plugin matches the keys it
//! knows and bounds each value ([`Setting::within`]).

/// One `key = value` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting<'a> {
    plugin: &'a str,
    line: usize,
    /// The key, trimmed.
    pub key: &'a str,
    value: u64,
}

impl Setting<'_> {
    /// The value, or an error naming the plugin, line and bounds if it is not in `lo..=hi`.
    pub fn within(&self, lo: u64, hi: u64) -> Result<u64, String> {
        if (lo..=hi).contains(&self.value) {
            Ok(self.value)
        } else {
            Err(format!(
                "{} config line {}: `{}` must be in {lo}..={hi}",
                self.plugin, self.line, self.key
            ))
        }
    }

    /// The error for a key the plugin does not know.
    pub fn unknown(&self) -> String {
        format!(
            "{} config line {}: unknown key `{}`",
            self.plugin, self.line, self.key
        )
    }
}

/// The settings of `text`, in order; an error names `plugin` and the line.
pub fn settings<'a>(plugin: &'a str, text: &'a str) -> Result<Vec<Setting<'a>>, String> {
    let mut found = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let body = raw.split('#').next().unwrap_or_default().trim();
        if body.is_empty() {
            continue;
        }
        let (key, value) = body
            .split_once('=')
            .ok_or_else(|| format!("{plugin} config line {line}: expected `key = value`"))?;
        let key = key.trim();
        let value = value.trim().replace('_', "").parse().map_err(|_| {
            format!("{plugin} config line {line}: `{key}` needs a non-negative integer")
        })?;
        found.push(Setting {
            plugin,
            line,
            key,
            value,
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_comments_separators_and_errors() {
        assert_eq!(settings("p", "# nothing\n\n"), Ok(Vec::new()));
        let s = settings("p", "a = 2_048 # two KiB\nb=0\n").unwrap();
        assert_eq!((s[0].key, s[0].within(1, 4096)), ("a", Ok(2048)));
        assert!(s[1]
            .within(1, 10)
            .unwrap_err()
            .contains("p config line 2: `b`"));
        assert!(s[1].unknown().contains("unknown key `b`"));
        assert!(settings("p", "a").unwrap_err().contains("line 1"));
        assert!(settings("p", "a = -1").is_err());
        assert!(settings("p", "a = big").is_err());
    }
}
