//! A topic's schema registry: the schemas producers declared, by version (Pulsar's
//! `CommandGetSchema` / `CommandGetOrCreateSchema`, and the `schema` of `CommandProducer`).
//!
//! Versions count from 0 and travel as 8-byte big-endian numbers, as Pulsar's
//! `LongSchemaVersion`. A schema equal to a stored one (same type, definition and
//! properties) gets that version; any other gets the next one. Deliberately not done:
//! compatibility checks between versions (Pulsar's strategies) and schema deletion.
//!
//! Durability: the whole registry is rewritten (temp file, fsync, rename, directory fsync)
//! when a version is added, which is rare; a crash leaves the old or the new file.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use prost::Message as _;
use pulsar::message::proto::Schema;

use crate::log::{append_checksum, checked_contents, sync_dir};

/// Most schema versions one topic keeps (schemas come from clients).
pub const MAX_VERSIONS: usize = 1000;
const FILE: &str = "schemas";

/// Why a schema could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("too many schema versions (limit {MAX_VERSIONS})")]
    TooMany,
    #[error("storing the schema failed: {0}")]
    Io(#[from] io::Error),
}

/// The schemas of one topic.
pub struct SchemaStore {
    path: PathBuf,
    versions: Vec<Schema>,
}

/// A schema version on the wire.
pub fn version_bytes(version: u64) -> Vec<u8> {
    version.to_be_bytes().to_vec()
}

/// A schema version from the wire (`None` if it is not one of ours).
pub fn parse_version(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn same(a: &Schema, b: &Schema) -> bool {
    a.r#type == b.r#type && a.schema_data == b.schema_data && a.properties == b.properties
}

impl SchemaStore {
    /// Loads the registry of the topic in `topic_dir` (empty if there is none, or if the
    /// file is unreadable, which is logged).
    pub fn load(topic_dir: &Path) -> SchemaStore {
        let path = topic_dir.join(FILE);
        let versions = match fs::read(&path) {
            Ok(bytes) => decode(&bytes).unwrap_or_else(|| {
                tracing::warn!(path = %path.display(), "schema registry unreadable; starting empty");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        SchemaStore { path, versions }
    }

    /// The schema of `version`, or the latest one.
    pub fn get(&self, version: Option<u64>) -> Option<(u64, &Schema)> {
        match version {
            Some(v) => self.versions.get(usize::try_from(v).ok()?).map(|s| (v, s)),
            None => self
                .versions
                .last()
                .map(|s| (self.versions.len() as u64 - 1, s)),
        }
    }

    /// The version of `schema`, adding it if it is new (blocking: writes the file).
    pub fn get_or_create(&mut self, schema: Schema) -> Result<u64, SchemaError> {
        if let Some(i) = self.versions.iter().position(|s| same(s, &schema)) {
            return Ok(i as u64);
        }
        if self.versions.len() >= MAX_VERSIONS {
            return Err(SchemaError::TooMany);
        }
        self.versions.push(schema);
        if let Err(e) = self.save() {
            self.versions.pop();
            return Err(e.into());
        }
        Ok(self.versions.len() as u64 - 1)
    }

    fn save(&self) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let mut buf = Vec::new();
        for s in &self.versions {
            buf.extend_from_slice(&(s.encoded_len() as u32).to_be_bytes());
            // Encoding into a Vec cannot fail.
            let _ = s.encode(&mut buf);
        }
        append_checksum(&mut buf);
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &self.path)?;
        sync_dir(dir)
    }
}

fn decode(bytes: &[u8]) -> Option<Vec<Schema>> {
    let mut body = checked_contents(bytes)?;
    let mut out = Vec::new();
    while !body.is_empty() {
        let (len, rest) = body.split_at_checked(4)?;
        let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
        let (one, rest) = rest.split_at_checked(len)?;
        out.push(Schema::decode(one).ok()?);
        body = rest;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(data: &str) -> Schema {
        Schema {
            name: "s".into(),
            schema_data: data.as_bytes().to_vec(),
            r#type: 2,
            properties: Vec::new(),
        }
    }

    #[test]
    fn versions_are_stable_and_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SchemaStore::load(dir.path());
        assert!(store.get(None).is_none());
        assert_eq!(store.get_or_create(schema("a")).unwrap(), 0);
        assert_eq!(store.get_or_create(schema("b")).unwrap(), 1);
        assert_eq!(store.get_or_create(schema("a")).unwrap(), 0);
        let store = SchemaStore::load(dir.path());
        assert_eq!(store.get(None).unwrap().0, 1);
        assert_eq!(store.get(Some(0)).unwrap().1.schema_data, b"a");
        assert!(store.get(Some(7)).is_none());
        assert_eq!(parse_version(&version_bytes(5)), Some(5));
    }
}
