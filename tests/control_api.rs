//! The control socket speaks JSON lines; the `--listen` port speaks HTTP
//! (`/metrics`) and peers, told apart by their first bytes. Malformed
//! requests get an error response naming the problem and the connection
//! (and the daemon) carry on; garbage gets its connection closed.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

fn line(r: &mut BufReader<UnixStream>) -> serde_json::Value {
    let mut s = String::new();
    r.read_line(&mut s).unwrap();
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

#[test]
fn json_lines_http_and_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let pool = init_pool(dir.path(), "pool.img", "256M");
    let mut d = Daemon::start(&pool);

    let s = d.control_conn();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let cases: &[(&str, &str)] = &[
        ("{nope\n", "not a JSON object"),
        ("{\"name\":\"x\"}\n", "missing \"op\""),
        ("{\"op\":\"explode\"}\n", "unknown variant `explode`"),
        ("{\"op\":\"vol_create\",\"name\":\"v\"}\n", "size_bytes"),
        (
            "{\"op\":\"vol_create\",\"name\":\"v\",\"size_bytes\":4097}\n",
            "4097",
        ),
    ];
    for (req, want) in cases {
        w.write_all(req.as_bytes()).unwrap();
        let v = line(&mut r);
        assert_eq!(v["ok"], false, "{req}: {v}");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(want), "{req}: {e}");
    }
    // Same connection, good requests now.
    w.write_all(
        b"{\"op\":\"vol_create\",\"name\":\"v\",\"size_bytes\":16777216}\n{\"op\":\"vol_list\"}\n",
    )
    .unwrap();
    assert_eq!(line(&mut r)["ok"], true);
    let v = line(&mut r);
    assert_eq!(v["result"][0]["name"], "v", "{v}");

    // HTTP metrics.
    let http = |path: &str| {
        let mut s = TcpStream::connect(&d.listen).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let m = http("/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(
        m.contains("Content-Type: application/openmetrics-text; version=1.0.0")
            && m.ends_with("# EOF\n"),
        "{m}"
    );
    // Every series names its node.
    let name = d.json(&["status"])["node"].as_str().unwrap().to_string();
    for l in m.lines().filter(|l| l.starts_with("sluice_")) {
        assert!(
            l.contains(&format!("{{node=\"{name}\"")),
            "no node label: {l}"
        );
    }
    let m = without_node_label(&m);
    for want in [
        "sluice_up 1",
        "sluice_pool_bytes{state=\"free\"}",
        "sluice_volume_size_bytes{volume=\"v\"} 16777216",
        "sluice_control_requests_total{result=\"error\"} 5",
        "sluice_nbd_",
        "sluice_repl_",
    ] {
        assert!(m.contains(want), "missing {want} in {m}");
    }
    assert!(http("/nope").starts_with("HTTP/1.1 404"));

    // Garbage first bytes: closed, logged, daemon fine.
    let mut g = TcpStream::connect(&d.listen).unwrap();
    g.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).unwrap();
    let mut buf = Vec::new();
    let _ = g.read_to_end(&mut buf);
    assert!(buf.is_empty());
    // An over-long line: error response, then closed.
    let mut big = d.control_conn();
    let mut payload = b"{\"op\":\"status\",\"pad\":\"".to_vec();
    payload.resize((1 << 20) + 100, b'a');
    let _ = big.write_all(&payload);
    let mut resp = String::new();
    let _ = BufReader::new(big).read_line(&mut resp);
    assert!(resp.contains("longer than"), "{resp}");

    assert!(d.alive());
    d.ok(&["status"]);
    let log = d.log_text();
    assert!(log.contains("unrecognised first bytes"), "{log}");
}
