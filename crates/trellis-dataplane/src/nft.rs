//! nftables through its JSON API: `nft -j -f -` applies a whole batch atomically (all or
//! nothing), and `nft -j list` reads state back. Runs `nft` in the caller's namespace.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::{DataplaneError, Result};

fn nft_binary() -> String {
    std::env::var("TRELLIS_NFT").unwrap_or_else(|_| "nft".to_string())
}

/// Applies `{"nftables": [...commands]}` as one transaction.
pub fn apply(commands: Vec<Value>) -> Result<()> {
    let doc = serde_json::json!({ "nftables": commands });
    let mut child = Command::new(nft_binary())
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DataplaneError::Nft {
            message: format!("cannot run nft (is the nftables package installed?): {e}"),
        })?;
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(doc.to_string().as_bytes())
        .map_err(|e| DataplaneError::Nft {
            message: format!("writing to nft: {e}"),
        })?;
    let out = child.wait_with_output().map_err(|e| DataplaneError::Nft {
        message: format!("waiting for nft: {e}"),
    })?;
    if !out.status.success() {
        return Err(DataplaneError::Nft {
            message: format!(
                "nft rejected the batch: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Lists one table; `None` when it does not exist.
pub fn list_table(family: &str, table: &str) -> Result<Option<Value>> {
    let out = Command::new(nft_binary())
        .args(["-j", "list", "table", family, table])
        .output()
        .map_err(|e| DataplaneError::Nft {
            message: format!("cannot run nft (is the nftables package installed?): {e}"),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(DataplaneError::Nft {
            message: format!("nft list table {family} {table}: {}", err.trim()),
        });
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| DataplaneError::Nft {
            message: format!("cannot parse nft JSON output: {e}"),
        })
}

/// The rules of a listed table as `(chain, handle, comment)`.
pub fn rules(listing: &Value) -> Vec<(String, u64, Option<String>)> {
    let Some(items) = listing.get("nftables").and_then(Value::as_array) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| i.get("rule"))
        .filter_map(|r| {
            Some((
                r.get("chain")?.as_str()?.to_string(),
                r.get("handle")?.as_u64()?,
                r.get("comment").and_then(Value::as_str).map(str::to_string),
            ))
        })
        .collect()
}
