//! Binding a repository to one cluster: its system identifier and WAL segment size.

use bytes::Bytes;
use walferry_formats::layout::{ClusterBinding, CLUSTER_KEY};
use walferry_formats::{Error, Repository, SegmentSize};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("this repository belongs to cluster {stored_id} (wal_segment_size {stored_size}), but the server is cluster {id} (wal_segment_size {size}); use a repository per cluster")]
    OtherCluster {
        stored_id: String,
        stored_size: u64,
        id: String,
        size: u64,
    },
    #[error(transparent)]
    Store(#[from] Error),
}

/// Records the binding on first use; afterwards refuses any other cluster.
pub async fn bind(
    repo: &Repository,
    system_identifier: u64,
    size: SegmentSize,
    server_version_num: Option<u32>,
) -> Result<ClusterBinding, BindError> {
    let ours = ClusterBinding {
        system_identifier: system_identifier.to_string(),
        wal_segment_size: size,
        server_version_num,
        bound_at: jiff::Timestamp::now().to_string(),
    };
    let stored = match repo.get(CLUSTER_KEY).await {
        Ok(b) => ClusterBinding::from_json(&b)?,
        Err(e) if e.is_not_found() => {
            match repo.put(CLUSTER_KEY, Bytes::from(ours.to_json())).await {
                Ok(_) => return Ok(ours),
                // Another writer bound it first: compare with theirs.
                Err(Error::Conflict { .. }) => {
                    ClusterBinding::from_json(&repo.get(CLUSTER_KEY).await?)?
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    if stored.system_identifier != ours.system_identifier || stored.wal_segment_size != size {
        return Err(BindError::OtherCluster {
            stored_id: stored.system_identifier,
            stored_size: stored.wal_segment_size.bytes(),
            id: ours.system_identifier,
            size: size.bytes(),
        });
    }
    Ok(stored)
}
