//! Text output: tables a person can scan.

use serde_json::Value;

use crate::Command;

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut out = String::new();
        for (i, (cell, w)) in cells.into_iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i + 1 < n {
                let pad = w - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// `2026-05-01 10:00:00` (UTC) from milliseconds since the epoch.
pub(crate) fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn duration_us(us: &Value) -> String {
    let us = us.as_u64().unwrap_or(0);
    if us < 1000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

fn ms(v: &Value) -> String {
    let ms = v.as_u64().unwrap_or(0);
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

fn implementation(i: &Value) -> String {
    match i["kind"].as_str() {
        Some("original") => "original".into(),
        Some("patch") => format!("patch #{} ({})", s(&i["id"]), s(&i["name"])),
        _ => s(i),
    }
}

fn peer(p: &Value) -> String {
    if p.is_null() {
        "the service".into()
    } else {
        format!("uid {} pid {}", s(&p["uid"]), s(&p["pid"]))
    }
}

fn patch_line(p: &Value) -> String {
    format!(
        "patch #{} {} {}",
        s(&p["id"]),
        s(&p["name"]),
        s(&p["version"])
    )
}

pub(crate) fn ps(rows: &[Value]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                s(&r["pid"]),
                s(&r["service"]),
                s(&r["patches"]),
                s(&r["socket"]),
            ]
        })
        .collect();
    table(&["PID", "SERVICE", "PATCHES", "SOCKET"], &rows)
}

fn threads(waiting: &[Value]) -> String {
    let rows: Vec<Vec<String>> = waiting
        .iter()
        .map(|t| vec![s(&t["tid"]), s(&t["name"]), ms(&t["without_safepoint_ms"])])
        .collect();
    table(&["TID", "THREAD", "WITHOUT SAFEPOINT"], &rows)
}

fn status(r: &Value) -> String {
    let mut out = format!(
        "{}  pid {}  uid {}  hotpatch {}\nsocket {}\n\n",
        s(&r["service"]),
        s(&r["pid"]),
        s(&r["uid"]),
        s(&r["hotpatch_version"]),
        s(&r["socket"])
    );
    let patches = arr(&r["patches"]);
    if patches.is_empty() {
        out.push_str("PATCHES  none applied\n");
    } else {
        out.push_str("PATCHES\n");
        let rows: Vec<Vec<String>> = patches
            .iter()
            .map(|p| {
                vec![
                    s(&p["id"]),
                    s(&p["name"]),
                    s(&p["version"]),
                    s(&p["state"]),
                    placement(&p["placement"]),
                    p["applied_at_ms"].as_u64().map_or("-".into(), utc),
                    peer(&p["applied_by"]),
                    s(&p["description"]),
                    s(&p["file"]),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "ID",
                "NAME",
                "VERSION",
                "STATE",
                "CODE",
                "APPLIED (UTC)",
                "BY",
                "DESCRIPTION",
                "FILE",
            ],
            &rows,
        ));
    }
    out.push_str("\nFUNCTIONS\n");
    let rows: Vec<Vec<String>> = arr(&r["functions"])
        .iter()
        .map(|f| {
            let mut i = implementation(&f["implementation"]);
            if f["hooked"] == Value::Bool(true) {
                i.push_str(" (hooked)");
            }
            if f["in_transition"] == Value::Bool(true) {
                i.push_str(" (switching)");
            }
            vec![s(&f["path"]), i]
        })
        .collect();
    out.push_str(&table(&["PATH", "IMPLEMENTATION"], &rows));
    let t = &r["transition"];
    if t.is_null() {
        out.push_str("\nTRANSITION  none\n");
    } else {
        let waiting = arr(&t["waiting_for"]);
        out.push_str(&format!(
            "\nTRANSITION  {}{} for {}, waiting for {} thread(s)\n",
            s(&t["what"]),
            if t["reversing"] == Value::Bool(true) {
                " (reversing)"
            } else {
                ""
            },
            ms(&t["elapsed_ms"]),
            waiting.len()
        ));
        if !waiting.is_empty() {
            out.push_str(&threads(waiting));
        }
    }
    out.push_str(&state(&r["state"]));
    out
}

/// `events --follow`: the header, once.
pub(crate) fn event_header() -> &'static str {
    "SEQ  TIME (UTC)  OP  OUTCOME  PATCH  PEER  MESSAGE"
}

/// `events --follow`: one event, fields two spaces apart.
pub(crate) fn event_line(e: &Value) -> String {
    event_row(e).join("  ")
}

fn event_row(e: &Value) -> Vec<String> {
    let patch = &e["patch"];
    vec![
        s(&e["seq"]),
        e["at_ms"].as_u64().map_or("-".into(), utc),
        s(&e["op"]),
        s(&e["outcome"]),
        if patch.is_null() {
            "-".into()
        } else {
            format!("#{} {}", s(&patch["id"]), s(&patch["name"]))
        },
        if e["peer"].is_null() {
            "-".into()
        } else {
            peer(&e["peer"])
        },
        s(&e["message"]),
    ]
}

fn events(r: &Value) -> String {
    let events = arr(&r["events"]);
    if events.is_empty() {
        return "no events\n".into();
    }
    let rows: Vec<Vec<String>> = events.iter().map(event_row).collect();
    table(
        &[
            "SEQ",
            "TIME (UTC)",
            "OP",
            "OUTCOME",
            "PATCH",
            "PEER",
            "MESSAGE",
        ],
        &rows,
    )
}

/// The text of a successful reply to `command`.
pub(crate) fn reply(command: &Command, r: &Value) -> String {
    match command {
        Command::Ps | Command::Sign(_) => String::new(),
        Command::Status { .. } => status(r),
        Command::Events { .. } => events(r),
        Command::Apply { .. } => {
            let p = &r["patch"];
            let mut out = format!(
                "applied {} ({}) in {}\n  replaces {}\n",
                patch_line(p),
                s(&p["description"]),
                duration_us(&r["duration_us"]),
                functions(&p["functions"])
            );
            let w = &r["watch"];
            if !w.is_null() {
                let checks = match w["check_rounds"].as_u64() {
                    Some(0) => "no health check registered".to_owned(),
                    _ => format!("{} round(s) of health checks", s(&w["check_rounds"])),
                };
                out.push_str(&format!(
                    "kept after a {} watch window: {} panic(s), {checks}\n",
                    ms(&w["window_ms"]),
                    s(&w["panics"]),
                ));
            }
            if !r["accepted"].is_null() {
                out.push_str(&accepted(&r["accepted"]));
            }
            out
        }
        Command::Accept { .. } => {
            format!(
                "{}{}",
                patch_line(&r["patch"]),
                accepted(&r["accepted"]).trim_start_matches("  ")
            )
        }
        Command::Check { .. } => {
            let c = &r["check"];
            let rows: Vec<Vec<String>> = arr(&c["functions"])
                .iter()
                .map(|f| vec![s(&f["path"]), implementation(&f["now"])])
                .collect();
            let mut out = format!(
                "{} {} ({}) passes every check; nothing was applied.\nApplying it would replace:\n",
                s(&c["name"]),
                s(&c["version"]),
                s(&c["description"])
            );
            out.push_str(&table(&["FUNCTION", "NOW"], &rows));
            if c["has_init"] == Value::Bool(true) {
                out.push_str("It has an init function, which runs at apply (not at check).\n");
            }
            out
        }
        Command::Revert { .. } => {
            let mut out = format!(
                "reverted {} in {}\n",
                patch_line(&r["reverted"]),
                duration_us(&r["duration_us"])
            );
            if r["unaccepted"]["seq"].is_u64() {
                out.push_str("  no longer accepted: it will not be re-applied at restart\n");
            }
            out
        }
        Command::Replace { .. } => format!(
            "replaced {} by {} in {}\n  replaces {}\n",
            patch_line(&r["replaced"]),
            patch_line(&r["patch"]),
            duration_us(&r["duration_us"]),
            functions(&r["patch"]["functions"])
        ),
    }
}

fn accepted(a: &Value) -> String {
    format!(
        "  accepted as #{}: kept in {}, re-applied at restart\n",
        s(&a["seq"]),
        s(&a["file"])
    )
}

fn state(st: &Value) -> String {
    if st.is_null() {
        return "\nACCEPTED  no state directory (patches cannot be accepted)\n".into();
    }
    let mut out = format!("\nACCEPTED  state directory {}", s(&st["dir"]));
    if st["disabled"] == Value::Bool(true) {
        out.push_str("  (HOTPATCH_DISABLE set: none applied at start-up)");
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = arr(&st["accepted"])
        .iter()
        .map(|e| {
            vec![
                s(&e["seq"]),
                s(&e["name"]),
                s(&e["version"]),
                if e["applied_as"].is_null() {
                    "not applied".into()
                } else {
                    format!("#{}", s(&e["applied_as"]))
                },
                e["accepted_at_ms"].as_u64().map_or("-".into(), utc),
                s(&e["file"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("none accepted\n");
    } else {
        out.push_str(&table(
            &[
                "#",
                "NAME",
                "VERSION",
                "APPLIED AS",
                "ACCEPTED (UTC)",
                "STORED",
            ],
            &rows,
        ));
    }
    let rejected = arr(&st["rejected"]);
    if !rejected.is_empty() {
        out.push_str("\nREJECTED AT START-UP (set aside, not applied)\n");
        let rows: Vec<Vec<String>> = rejected
            .iter()
            .map(|r| {
                vec![
                    s(&r["kind"]),
                    s(&r["name"]),
                    s(&r["moved_to"]),
                    s(&r["message"]),
                ]
            })
            .collect();
        out.push_str(&table(&["WHY", "NAME", "KEPT IN", "MESSAGE"], &rows));
    }
    out
}

fn functions(v: &Value) -> String {
    arr(v).iter().map(s).collect::<Vec<_>>().join(", ")
}

/// Where a patch's code is (the status reply's `placement`): `near`, or
/// `dlopen (why not near)`; `-` from a service that does not say.
fn placement(p: &Value) -> String {
    match p["kind"].as_str() {
        Some("near") => "near".to_owned(),
        Some(kind) => match p["reason"].as_str() {
            Some(reason) => format!("{kind} ({reason})"),
            None => kind.to_owned(),
        },
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_767_225_599_000), "2025-12-31 23:59:59");
    }
}
