//! The libpq password file (`~/.pgpass`, or PGPASSFILE / `passfile=`).
//!
//! Lines are `hostname:port:database:username:password`. Each of the first four fields is a
//! literal or `*` (matches anything); `\:` and `\\` escape. The first matching line wins.
//! As in libpq, the file is ignored (with a warning) unless it is a plain file without any
//! group or other permissions (0600 or stricter), and a unix socket in the default socket
//! directory matches the hostname `localhost`.

use std::io;
use std::path::Path;

use super::conninfo::{default_socket_dir, Host, Password};

/// Look up the password for `host`/`dbname`/`user` in the password file at `path`.
/// A missing file is `Ok(None)`; an unsafe one is ignored with a warning.
pub(crate) fn lookup(
    path: &Path,
    host: &Host,
    dbname: &str,
    user: &str,
) -> io::Result<Option<Password>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        tracing::warn!(path = %path.display(), "password file is not a plain file; ignoring it");
        return Ok(None);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "password file has group or world access; permissions should be u=rw (0600) or less; ignoring it"
            );
            return Ok(None);
        }
    }
    let text = std::fs::read(path)?;
    let text = String::from_utf8_lossy(&text);
    let hostname = match host {
        Host::Tcp { name, .. } => name.clone(),
        Host::Unix { dir, .. } if *dir == default_socket_dir() => "localhost".to_owned(),
        Host::Unix { dir, .. } => dir.display().to_string(),
    };
    Ok(find(&text, &hostname, &host.port().to_string(), dbname, user).map(Password::new))
}

/// The password of the first line of `text` matching the four keys.
pub(crate) fn find(text: &str, host: &str, port: &str, dbname: &str, user: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(fields) = split_fields(line) else {
            continue;
        };
        let keys = [host, port, dbname, user];
        if fields[..4]
            .iter()
            .zip(keys)
            .all(|(f, key)| f.wildcard || f.value == key)
        {
            return Some(fields[4].value.clone());
        }
    }
    None
}

struct Field {
    value: String,
    /// The field was exactly an unescaped `*`.
    wildcard: bool,
}

/// Split into 4 keys plus the password (the rest of the line, de-escaped). None when the
/// line has fewer than five fields.
fn split_fields(line: &str) -> Option<Vec<Field>> {
    let mut fields = Vec::with_capacity(5);
    let mut cur = String::new();
    let mut escaped_any = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                escaped_any = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ':' if fields.len() < 4 => {
                let wildcard = cur == "*" && !escaped_any;
                fields.push(Field {
                    value: std::mem::take(&mut cur),
                    wildcard,
                });
                escaped_any = false;
            }
            c => cur.push(c),
        }
    }
    if fields.len() < 4 {
        return None;
    }
    fields.push(Field {
        value: cur,
        wildcard: false,
    });
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn matching_rules() {
        let text = "\
# comment line
db1:5432:app:alice:pw-app
db1:5432:*:alice:pw-any-db
*:*:*:bob:pw\\:with\\\\colon
host\\:x:5432:*:carol:escaped-host
\\*:*:*:dave:literal-star
*:*:replication:*:pw-repl
short:line
";
        assert_eq!(
            find(text, "db1", "5432", "app", "alice").as_deref(),
            Some("pw-app")
        );
        assert_eq!(
            find(text, "db1", "5432", "other", "alice").as_deref(),
            Some("pw-any-db")
        );
        assert_eq!(find(text, "db1", "5433", "app", "alice"), None);
        assert_eq!(
            find(text, "anything", "1", "x", "bob").as_deref(),
            Some("pw:with\\colon")
        );
        assert_eq!(
            find(text, "host:x", "5432", "d", "carol").as_deref(),
            Some("escaped-host")
        );
        assert_eq!(find(text, "h", "5432", "d", "dave"), None);
        assert_eq!(
            find(text, "*", "5432", "d", "dave").as_deref(),
            Some("literal-star")
        );
        assert_eq!(
            find(text, "h", "1", "replication", "zed").as_deref(),
            Some("pw-repl")
        );
        // Colons after the fourth field belong to the password.
        assert_eq!(
            find("h:1:d:u:a:b:c", "h", "1", "d", "u").as_deref(),
            Some("a:b:c")
        );
    }

    #[cfg(unix)]
    #[test]
    fn file_permissions_and_socket_hosts() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(
            &path,
            "localhost:5432:*:u:via-localhost\n/tmp/sockdir:5432:*:u:via-dir\n",
        )
        .unwrap();
        let tcp = Host::Tcp {
            name: "localhost".into(),
            port: 5432,
        };
        let sock = Host::Unix {
            dir: PathBuf::from("/tmp/sockdir"),
            port: 5432,
        };
        let default_sock = Host::Unix {
            dir: default_socket_dir(),
            port: 5432,
        };

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(lookup(&path, &tcp, "replication", "u").unwrap(), None);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let get = |h: &Host| {
            lookup(&path, h, "replication", "u")
                .unwrap()
                .map(|p| p.expose().to_owned())
        };
        assert_eq!(get(&tcp).as_deref(), Some("via-localhost"));
        assert_eq!(get(&sock).as_deref(), Some("via-dir"));
        assert_eq!(get(&default_sock).as_deref(), Some("via-localhost"));

        assert_eq!(
            lookup(&dir.path().join("missing"), &tcp, "d", "u").unwrap(),
            None
        );
    }
}
