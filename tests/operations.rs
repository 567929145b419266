//! The classic operations as built-ins: flatten, combine, top_per_key,
//! count_per_element, reduce_by_key_and_window, cogroup and join.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

fn text_lines(p: &std::path::Path) -> Vec<(String, String)> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('\t').expect("key<TAB>value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The last value emitted per key.
fn last(p: &std::path::Path) -> BTreeMap<String, String> {
    text_lines(p).into_iter().collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn classic_operations_give_exact_results() {
    let s = Scratch::new();
    std::fs::write(s.path("l.csv"), "u1,1,3\nu1,2,5\nu2,3,1\nu1,12,2\n").expect("write");
    std::fs::write(s.path("r.csv"), "u1,4,10\nu2,5,20\nu2,15,30\n").expect("write");
    let mut toml = String::from("[service]\ndata_dir = \"{dir}/data\"\n[engine]\nshards = 3\n");
    for side in ["l", "r"] {
        toml.push_str(&format!(
            "[sources.{side}src]\ntype = \"file\"\npath = \"{{dir}}/{side}.csv\"\ntimestamp = \"field:1\"\ndelimiter = \",\"\ntimestamp_unit = \"s\"\n\
             [computations.{side}k]\ntype = \"map\"\ninputs = [\"{side}src\"]\nkey = \"field:0\"\nvalue = \"field:2\"\ndelimiter = \",\"\n"
        ));
    }
    let window = "window = { kind = \"fixed\", size = \"10s\" }";
    for (name, kind, inputs, extra) in [
        ("both", "flatten", "[\"lk\", \"rk\"]", ""),
        ("sums", "combine", "[\"both\"]", "aggregate = \"sum\""),
        ("top", "top_per_key", "[\"both\"]", "n = 2"),
        (
            "elements",
            "count_per_element",
            "[{ from = \"both\", key = \"value\" }]",
            "",
        ),
        (
            "windowed",
            "reduce_by_key_and_window",
            "[\"both\"]",
            "op = \"sum\"",
        ),
        ("groups", "cogroup", "[\"lk\", \"rk\"]", ""),
        ("pairs", "join", "[\"lk\", \"rk\"]", ""),
    ] {
        let extra = if matches!(kind, "reduce_by_key_and_window" | "cogroup" | "join") {
            format!("{extra}\n{window}")
        } else {
            extra.to_owned()
        };
        toml.push_str(&format!(
            "[computations.{name}]\ntype = \"{kind}\"\ninputs = {inputs}\n{extra}\n\
             [sinks.{name}_out]\ntype = \"file\"\ninputs = [\"{name}\"]\npath = \"{{dir}}/{name}.txt\"\nformat = \"text\"\n"
        ));
    }
    let topo = s.write("ops.toml", &toml);
    let out = run_to_end(&topo, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // flatten: all seven records.
    assert_eq!(text_lines(&s.path("both.txt")).len(), 7);
    // combine (sum): one output per record; the last per key is the total.
    assert_eq!(text_lines(&s.path("sums.txt")).len(), 7);
    assert_eq!(
        last(&s.path("sums.txt")),
        BTreeMap::from([("u1".into(), "20".into()), ("u2".into(), "51".into())])
    );
    // top_per_key: the two largest per key at the end.
    assert_eq!(
        last(&s.path("top.txt")),
        BTreeMap::from([
            ("u1".into(), "[10,5]".into()),
            ("u2".into(), "[30,20]".into())
        ])
    );
    // count_per_element: every value is distinct here.
    let elements = sorted(
        text_lines(&s.path("elements.txt"))
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
    );
    assert_eq!(
        elements,
        ["10=1", "1=1", "20=1", "2=1", "30=1", "3=1", "5=1"]
    );

    let windowed = |name: &str, field: &str| {
        sorted(
            text_lines(&s.path(name))
                .into_iter()
                .map(|(k, v)| {
                    let v: serde_json::Value = serde_json::from_str(&v).expect("JSON pane");
                    format!("{k} {} {}", v["window"]["start"], v[field])
                })
                .collect(),
        )
    };
    assert_eq!(
        windowed("windowed.txt", "value"),
        ["u1 0 18", "u1 10000000 2", "u2 0 21", "u2 10000000 30"]
    );
    assert_eq!(
        windowed("groups.txt", "value"),
        [
            r#"u1 0 {"lk":["3","5"],"rk":["10"]}"#,
            r#"u1 10000000 {"lk":["2"]}"#,
            r#"u2 0 {"lk":["1"],"rk":["20"]}"#,
            r#"u2 10000000 {"rk":["30"]}"#,
        ]
    );
    let pairs = sorted(
        text_lines(&s.path("pairs.txt"))
            .into_iter()
            .map(|(k, v)| {
                let v: serde_json::Value = serde_json::from_str(&v).expect("JSON pair");
                format!(
                    "{k} {}+{}",
                    v["left"].as_str().unwrap_or("?"),
                    v["right"].as_str().unwrap_or("?")
                )
            })
            .collect(),
    );
    assert_eq!(pairs, ["u1 3+10", "u1 5+10", "u2 1+20"]);
}
