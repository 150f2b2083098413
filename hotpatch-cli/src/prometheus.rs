//! `hotpatch status --prometheus`: a process's patch state in the
//! Prometheus text exposition format, for node_exporter's textfile
//! collector (`hotpatch status --prometheus > DIR/hotpatch.prom.$$ && mv
//! ...`). The same names as the runtime's `metrics` feature where they
//! overlap (`hotpatch_patches_applied`, `hotpatch_patches_accepted`); the
//! counters and histograms of operations are the service's own recorder's.

use serde_json::Value;

/// The status reply `r` as Prometheus text: every sample labelled with
/// the service and its pid.
pub(crate) fn status(r: &Value) -> String {
    let base = format!(
        "service=\"{}\",pid=\"{}\"",
        escape(text(&r["service"])),
        escape(&r["pid"].to_string())
    );
    let patches = r["patches"].as_array().map_or(&[][..], Vec::as_slice);
    let accepted = r["state"]["accepted"].as_array().map_or(0, Vec::len);
    let patched = r["functions"].as_array().map_or(0, |f| {
        f.iter()
            .filter(|f| f["implementation"]["kind"] == "patch")
            .count()
    });
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(String, usize)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (labels, value) in samples {
            out.push_str(&format!("{name}{{{labels}}} {value}\n"));
        }
    };
    gauge(
        "hotpatch_patches_applied",
        "Patches applied in the process.",
        &[(base.clone(), patches.len())],
    );
    gauge(
        "hotpatch_patches_accepted",
        "Patches in the state directory's record (re-applied at restart).",
        &[(base.clone(), accepted)],
    );
    let info: Vec<(String, usize)> = patches
        .iter()
        .map(|p| {
            let labels = format!(
                "{base},id=\"{}\",name=\"{}\",version=\"{}\",build_id=\"{}\",state=\"{}\"",
                escape(&p["id"].to_string()),
                escape(text(&p["name"])),
                escape(text(&p["version"])),
                escape(text(&r["build_id"])),
                escape(text(&p["state"]))
            );
            (labels, 1)
        })
        .collect();
    gauge(
        "hotpatch_patch_info",
        "One per applied patch: its id, name, version, state and the build-id it is bound to.",
        &info,
    );
    gauge(
        "hotpatch_functions_patched",
        "Patchable functions whose implementation is a patch.",
        &[(base.clone(), patched)],
    );
    gauge(
        "hotpatch_transition_in_progress",
        "1 while a transition (apply, revert, replace) waits for threads or requests.",
        &[(base, usize::from(!r["transition"].is_null()))],
    );
    out
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A label value as the text format requires: `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_as_prometheus_text() {
        let r = json!({
            "service": "pricing", "pid": 42, "build_id": "ab12",
            "patches": [{"id": 3, "name": "fix\"1", "version": "1.0.0", "state": "accepted"}],
            "functions": [
                {"path": "a", "implementation": {"kind": "patch", "id": 3, "name": "fix"}},
                {"path": "b", "implementation": {"kind": "original"}},
            ],
            "transition": null,
            "state": {"accepted": [{"seq": 1}]},
        });
        let text = status(&r);
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                r#"hotpatch_patches_applied{service="pricing",pid="42"} 1"#,
                r#"hotpatch_patches_accepted{service="pricing",pid="42"} 1"#,
                r#"hotpatch_patch_info{service="pricing",pid="42",id="3",name="fix\"1",version="1.0.0",build_id="ab12",state="accepted"} 1"#,
                r#"hotpatch_functions_patched{service="pricing",pid="42"} 1"#,
                r#"hotpatch_transition_in_progress{service="pricing",pid="42"} 0"#,
            ]
        );
        assert!(text.contains("# TYPE hotpatch_patch_info gauge\n"));
    }
}
