//! PostgreSQL's `backup_manifest` (version 1) for backups that read the data directory
//! directly, so `pg_verifybackup` checks their restores as it checks BASE_BACKUP's.
//!
//! The layout follows what the server writes: one file per line, and a SHA-256 over
//! everything before the last line, which holds that checksum.

use sha2::{Digest, Sha256};
use walferry_formats::{Lsn, TimelineId};

/// One file as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgFile {
    /// Relative to the data directory; tablespace files under `pg_tblspc/<oid>/`.
    pub path: String,
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
    pub crc32c: u32,
}

/// The manifest text. Files are listed in the order given.
pub fn render(files: &[PgFile], tli: TimelineId, start: Lsn, end: Lsn) -> String {
    let mut out = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
    for (i, f) in files.iter().enumerate() {
        let modified = jiff::Timestamp::from_second(f.mtime)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .strftime("%Y-%m-%d %H:%M:%S GMT");
        // The server prints the CRC's bytes in memory order (little-endian here).
        out.push_str(&format!(
            "{{ \"Path\": {}, \"Size\": {}, \"Last-Modified\": \"{modified}\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\" }}{}\n",
            serde_json::Value::String(f.path.clone()),
            f.size,
            hex::encode(f.crc32c.to_le_bytes()),
            if i + 1 < files.len() { "," } else { "" }
        ));
    }
    out.push_str(&format!(
        "],\n\"WAL-Ranges\": [\n{{ \"Timeline\": {}, \"Start-LSN\": \"{start}\", \"End-LSN\": \"{end}\" }}\n],\n",
        tli.0
    ));
    let sum = hex::encode(Sha256::digest(out.as_bytes()));
    out.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_covers_all_but_the_last_line() {
        let files = [
            PgFile {
                path: "PG_VERSION".into(),
                size: 3,
                mtime: 0,
                crc32c: crc32c::crc32c(b"15\n"),
            },
            PgFile {
                path: "base/1/1259".into(),
                size: 8192,
                mtime: 1_700_000_000,
                crc32c: 0x0102_0304,
            },
        ];
        let m = render(&files, TimelineId(1), Lsn(0x2000028), Lsn(0x2000100));
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["Files"][1]["Checksum"], "04030201");
        assert_eq!(v["Files"][1]["Last-Modified"], "2023-11-14 22:13:20 GMT");
        assert_eq!(v["WAL-Ranges"][0]["Start-LSN"], "0/2000028");
        let body = &m[..m.trim_end().rfind('\n').unwrap() + 1];
        assert_eq!(
            v["Manifest-Checksum"],
            hex::encode(Sha256::digest(body.as_bytes()))
        );
        assert!(m.ends_with("}\n"));
    }
}
