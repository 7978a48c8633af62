use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "WEB_WRITE_KEY" => Some("wk-web".into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Config, Diagnostics> {
    Config::parse(Path::new("/etc/sluice/sluice.toml"), text, &env)
}

#[test]
fn empty_file_gets_embedded_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8088");
    assert!(c.server.admin_token.is_none());
    assert_eq!(c.storage.url, "file:///etc/sluice/data/lake");
    assert_eq!(c.storage.flush_interval, Duration::from_secs(10));
    assert_eq!(c.log.dir, Path::new("/etc/sluice/data/log"));
    assert_eq!(c.dedup.window, Duration::from_secs(86_400));
    assert_eq!(c.schemas.unplanned, Unplanned::Allow);
    assert_eq!(c.schemas.violations, Violations::Flag);
    assert_eq!(c.segments.dir, Path::new("/etc/sluice/segments"));
}

#[test]
fn reads_the_contract_sketch() {
    let c = parse(
        r#"
[server]
listen = "127.0.0.1:9000"
admin_token = "${SLUICE_ADMIN_TOKEN}"

[[sources]]
name = "web"
write_key = "${WEB_WRITE_KEY}"
rate_limit = 5000

[[sources]]
name = "ios"
write_key = "${IOS_WRITE_KEY:-ios-default}"

[storage]
url = "s3://bucket/prefix"
flush_interval = "2s"

[log]
dir = "/var/lib/sluice/log"
segment_size = "8MiB"

[schemas]
dir = "plan"
unplanned = "block"
violations = "block"
"#,
    )
    .unwrap();
    assert_eq!(c.server.listen.port(), 9000);
    assert!(
        c.server.admin_token.is_none(),
        "unset token turns admin off"
    );
    assert_eq!(c.sources.len(), 2);
    assert_eq!(c.sources[0].write_key, "wk-web");
    assert_eq!(c.sources[0].rate_limit.map(|n| n.get()), Some(5000));
    assert_eq!(c.sources[1].write_key, "ios-default");
    assert_eq!(c.sources[1].rate_limit, None);
    assert_eq!(c.storage.url, "s3://bucket/prefix");
    assert_eq!(c.log.dir, Path::new("/var/lib/sluice/log"));
    assert_eq!(c.log.segment_size, 8 << 20);
    assert_eq!(c.schemas.dir, Path::new("/etc/sluice/plan"));
    assert_eq!(c.schemas.unplanned, Unplanned::Block);
    assert_eq!(c.source_by_write_key("wk-web").unwrap().name, "web");
}

#[test]
fn reports_every_error_at_once_with_line_and_column() {
    let err = parse(
        r#"[server]
listen = "nowhere"
colour = "blue"

[[sources]]
name = "web"
write_key = "${MISSING}"
rate_limit = "fast"

[storage]
url = "ftp://x"
flush_interval = "soon"

[schemas]
unplanned = "maybe"

[bogus]
"#,
    )
    .unwrap_err();
    let lines: Vec<String> = err.0.iter().map(|d| d.to_string()).collect();
    let expect = [
        "/etc/sluice/sluice.toml:2:10: `server.listen`",
        "/etc/sluice/sluice.toml:3:1: unknown key `server.colour`",
        "/etc/sluice/sluice.toml:7:13: `sources.write_key` is empty",
        "/etc/sluice/sluice.toml:8:14: `sources.rate_limit` must be an integer",
        "/etc/sluice/sluice.toml:11:7: `storage.url`: unknown scheme `ftp://`",
        "/etc/sluice/sluice.toml:12:18: `storage.flush_interval`",
        "/etc/sluice/sluice.toml:15:13: `schemas.unplanned` must be one of allow | block",
        "/etc/sluice/sluice.toml:17:2: unknown key `bogus`",
    ];
    assert_eq!(lines.len(), expect.len(), "{lines:#?}");
    for (line, prefix) in lines.iter().zip(expect) {
        assert!(
            line.starts_with(prefix),
            "{line:?} should start with {prefix:?}"
        );
    }
}

#[test]
fn toml_syntax_error_names_the_place() {
    let err = parse("[server]\nlisten = \n").unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].line, 2, "{}", err);
}

#[test]
fn duplicate_sources_and_keys_are_refused() {
    let err = parse(
        r#"
[[sources]]
name = "a"
write_key = "k"
[[sources]]
name = "a"
write_key = "k"
"#,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("two sources are named `a`"), "{text}");
    assert!(text.contains("two sources share this write key"), "{text}");
}

#[test]
fn a_source_without_a_key_is_an_error() {
    let err = parse("[[sources]]\nname = \"web\"\n").unwrap_err();
    assert!(
        err.to_string().contains("a source needs a `write_key`"),
        "{err}"
    );
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = Config::load(Path::new("/definitely/not/here.toml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/definitely/not/here.toml: cannot read config"),
        "{err}"
    );
}
