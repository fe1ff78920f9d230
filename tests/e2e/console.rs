//! The console's REST API through the real binary: login with the admin token into a session
//! cookie, CSRF on every write, bearer access for scripts, the same changes as the gRPC admin
//! (applied, persisted, audited), the live usage stream, the OpenAPI document (and the API held
//! to it by schemathesis), the app itself, and no secret in any answer.

use keypool_e2e::{Behavior, Gateway, config, hello, mock};
use serde_json::{Value, json};

const ADMIN: &str = "console-admin-token";
const T: &str = "client-token";
/// What the harness gives the key named `up` (it must never come back).
const KEY_SECRET: &str = "sk-test-up-0123456789";

async fn console(db: &str) -> anyhow::Result<(Gateway, String, keypool_e2e::MockServer)> {
    let up = mock("up", Behavior::default());
    let yaml = config()
        .token(T)
        .set("dbtype", "sqlite")
        .set("dbaddr", &format!("\"{db}\""))
        .block(&format!(
            "admin: {{token: {ADMIN}, secret_key: seal-key-for-tests}}"
        ))
        .key(&up, "up", "")
        .yaml();
    let gw = Gateway::start(&yaml).await?;
    let url = gw.console_url().await?;
    Ok((gw, url, up))
}

/// A client that keeps no cookies: each call says which it sends.
fn http() -> reqwest::Client {
    keypool_e2e::client()
}

async fn body(resp: reqwest::Response) -> anyhow::Result<(u16, Value)> {
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// Logs in: the cookie header to send and the session's CSRF token.
async fn login(url: &str) -> anyhow::Result<(String, String)> {
    let resp = http()
        .post(format!("{url}/api/login"))
        .json(&json!({"token": ADMIN}))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let set = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{attr} missing from {set}");
    }
    let cookie = set.split(';').next().unwrap_or_default().to_owned();
    let (_, session) = body(resp).await?;
    Ok((
        cookie,
        session["csrf"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[allow(clippy::too_many_lines)] // one operator's session, read top to bottom
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_changes_keys_and_gateways_and_sees_them_audited() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("console.sqlite").display().to_string();
    let (gw, url, _up) = console(&db).await?;
    let c = http();

    // nobody gets in without the token
    let (status, err) = body(c.get(format!("{url}/api/keys")).send().await?).await?;
    assert_eq!(status, 401);
    assert_eq!(err["error"]["code"], "invalid_api_key");
    let wrong = c
        .post(format!("{url}/api/login"))
        .json(&json!({"token": "guess"}))
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());

    let (cookie, csrf) = login(&url).await?;
    let (status, keys) = body(
        c.get(format!("{url}/api/keys"))
            .header("cookie", &cookie)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(keys[0]["name"], "up");
    assert_eq!(keys[0]["health"], "healthy");
    assert!(!keys.to_string().contains(KEY_SECRET), "{keys}");

    // a write without the session's CSRF token is refused, with it applied at once
    let off = json!({"enabled": false});
    let patch = |csrf: Option<&str>| {
        let mut r = c
            .patch(format!("{url}/api/keys/up"))
            .header("cookie", &cookie)
            .json(&off);
        if let Some(t) = csrf {
            r = r.header("x-csrf-token", t);
        }
        r.send()
    };
    let (status, err) = body(patch(None).await?).await?;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("access_denied"))
    );
    let (status, _) = body(patch(Some("not-the-token")).await?).await?;
    assert_eq!(status, 403);
    let (status, key) = body(patch(Some(&csrf)).await?).await?;
    assert_eq!((status, key["enabled"].as_bool()), (200, Some(false)));
    let refused = gw.chat(T, hello("gpt-4o-mini")).await?;
    assert_eq!(refused.status(), 503, "the disabled key is avoided at once");
    let on = c
        .patch(format!("{url}/api/keys/up"))
        .bearer_auth(ADMIN) // a script: the token on each call, no cookie, no CSRF
        .json(&json!({"enabled": true}))
        .send()
        .await?;
    assert_eq!(on.status(), 200);
    assert_eq!(gw.chat(T, hello("gpt-4o-mini")).await?.status(), 200);

    // a gateway created with a generated secret: shown once, then only its hash
    let spec =
        json!({"spec": {"name": "team", "models": ["gpt-4o-mini"]}, "generate_secret": true});
    let (status, created) = body(
        c.post(format!("{url}/api/gateways"))
            .header("cookie", &cookie)
            .header("x-csrf-token", &csrf)
            .json(&spec)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(status, 201, "{created}");
    let secret = created["secret"].as_str().unwrap_or_default().to_owned();
    assert!(secret.starts_with("kp-"), "{created}");
    let served = gw
        .http()
        .post(gw.url("/llm/api/team/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&hello("gpt-4o-mini"))
        .send()
        .await?;
    assert_eq!(served.status(), 200);
    let (_, listed) = body(
        c.get(format!("{url}/api/gateways"))
            .bearer_auth(ADMIN)
            .send()
            .await?,
    )
    .await?;
    let names: Vec<&str> = listed
        .as_array()
        .map(|a| a.iter().filter_map(|g| g["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["default", "team"]);
    assert!(!listed.to_string().contains(&secret), "{listed}");

    // the config validator's message, field path included
    let (status, err) = body(
        c.post(format!("{url}/api/gateways"))
            .bearer_auth(ADMIN)
            .json(&json!({"spec": {"name": "bad", "rate_limits": ["nonsense"]}}))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("rate_limits"),
        "{err}"
    );

    // every change audited: who (never the token), what, on what
    let (status, audit) = body(
        c.get(format!("{url}/api/audit"))
            .header("cookie", &cookie)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(status, 200);
    let rows: Vec<(String, String, String)> = audit
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                    (s("action"), s("target"), s("who"))
                })
                .collect()
        })
        .unwrap_or_default();
    let actions: Vec<&str> = rows.iter().map(|(a, _, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        ["gateway.create", "key.update", "key.update"],
        "{audit}"
    );
    assert!(rows[0].2.starts_with("console 127.0.0.1"), "{audit}");
    assert!(rows[1].2.starts_with("api 127.0.0.1"), "{audit}");
    assert_eq!(audit[2]["detail"], json!({"enabled": false}));
    for secret in [ADMIN, KEY_SECRET, &secret] {
        assert!(!audit.to_string().contains(secret), "{audit}");
    }

    // logging out ends the session
    let out = c
        .post(format!("{url}/api/logout"))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(out.status(), 204);
    let after = c
        .get(format!("{url}/api/keys"))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(after.status(), 401);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_and_the_app() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("console.sqlite").display().to_string();
    let (_gw, url, _up) = console(&db).await?;
    let c = http();

    let (status, doc) = body(c.get(format!("{url}/api/openapi.json")).send().await?).await?;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"]
            .as_str()
            .unwrap_or_default()
            .starts_with("3.")
    );
    for path in [
        "/api/login",
        "/api/keys",
        "/api/keys/{name}",
        "/api/gateways",
        "/api/gateways/{name}",
        "/api/gateways/{name}/rotate",
        "/api/usage",
        "/api/audit",
        "/api/status",
        "/api/events",
        "/api/prices",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(doc["components"]["schemas"]["KeyView"]["properties"]["secret_masked"].is_object());
    let page = c.get(format!("{url}/")).send().await?;
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let html = page.text().await?;
    assert!(html.contains("/assets/app.js") && html.contains("/assets/vendor/uplot.iife.min.js"));
    for asset in [
        "app.js",
        "app.css",
        "vendor/uplot.iife.min.js",
        "vendor/uplot.min.css",
    ] {
        let r = c.get(format!("{url}/assets/{asset}")).send().await?;
        assert_eq!(r.status(), 200, "{asset}");
    }

    Ok(())
}

/// Run-time prices through the API; bad queries and unserved methods answered in the API's own
/// shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_bad_queries_and_unserved_methods() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("console.sqlite").display().to_string();
    let (_gw, url, _up) = console(&db).await?;
    let c = http();
    // out-of-range times and limits are 400s in the API's shape, never a crash
    for query in [
        "usage?day_ms=9223372036854775806",
        "usage?to_ms=-5",
        "audit?limit=0",
        "audit?limit=x",
    ] {
        let (status, err) = body(
            c.get(format!("{url}/api/{query}"))
                .bearer_auth(ADMIN)
                .send()
                .await?,
        )
        .await?;
        assert_eq!(status, 400, "{query}: {err}");
        assert!(err["error"]["message"].is_string(), "{query}: {err}");
    }
    // run-time prices, as SetPrices: checked, then in force
    let set = json!({"pricing": [{"models": ["gpt-4o-mini"], "input": 0.15, "output": 0.6}]});
    let (status, prices) = body(
        c.put(format!("{url}/api/prices"))
            .bearer_auth(ADMIN)
            .json(&set)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(status, 200, "{prices}");
    assert_eq!(prices["admin"][0]["models"], json!(["gpt-4o-mini"]));
    let bad = json!({"pricing": [{"models": ["x"], "input": -1, "output": 1}]});
    let (status, err) = body(
        c.put(format!("{url}/api/prices"))
            .bearer_auth(ADMIN)
            .json(&bad)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("pricing[0]"),
        "{err}"
    );
    let wrong_method = c
        .delete(format!("{url}/api/status"))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(
        wrong_method
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok()),
        Some("GET")
    );

    Ok(())
}

/// The live stream: a finished request arrives as one `data:` line, without its prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_shows_finished_requests_without_their_prompts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("console.sqlite").display().to_string();
    let (gw, url, _up) = console(&db).await?;
    let c = http();
    let mut tail = c
        .get(format!("{url}/api/events"))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    assert_eq!(tail.status(), 200);
    let _ = tail.chunk().await?; // ": connected"
    let mut ask = hello("gpt-4o-mini");
    ask["messages"][0]["content"] = json!("a prompt the tail never shows");
    assert_eq!(gw.chat(T, ask).await?.status(), 200);
    let mut seen = String::new();
    while !seen.contains("data: ") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), tail.chunk())
            .await??
            .unwrap_or_default();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let line = seen
        .split("data: ")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default();
    let event: Value = serde_json::from_str(line)?;
    assert_eq!(
        (event["gateway"].as_str(), event["status"].as_i64()),
        (Some("default"), Some(200))
    );
    assert!(!seen.contains("a prompt the tail never shows"));
    Ok(())
}

/// The REST API against its own OpenAPI document, with schemathesis (from PyPI): generated
/// requests, valid and not, for every operation and method. Every check runs but
/// `positive_data_acceptance`: a gateway's spec and a key's endpoint are validated by the
/// config's own rules (names, URLs, rate-limit syntax), which JSON Schema cannot state, so a
/// schema-valid body may rightly be a 400 naming the field. Nothing may panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_holds_to_its_openapi_document() -> anyhow::Result<()> {
    let venv = tokio::task::spawn_blocking(keypool_e2e::python_venv).await??;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("console.sqlite").display().to_string();
    let (gw, url, _up) = console(&db).await?;
    // its entry point, through the venv's python (the venv was built elsewhere and moved: the
    // scripts' shebangs name where)
    let entry = "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; sys.exit(schemathesis())";
    let out = tokio::process::Command::new(venv.join("bin/python"))
        .args(["-c", entry, "run", &format!("{url}/api/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {ADMIN}")])
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--max-examples", "20", "--seed", "1"])
        .env("NO_COLOR", "1")
        .current_dir(dir.path()) // its cache of crashes stays out of the repository
        .output()
        .await?;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
    let logs = gw.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    for secret in [ADMIN, KEY_SECRET] {
        assert!(!report.contains(secret), "a secret in an answer: {report}");
    }
    Ok(())
}
