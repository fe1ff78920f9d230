//! Costs of real-shaped usage from both providers, at the built-in catalog's prices.

use keypool_types::Usage;

use crate::{Catalog, Cost, cost};

fn usage(json: &str) -> Usage {
    serde_json::from_str(json).unwrap()
}

fn priced(model: &str, json: &str) -> String {
    let price = Catalog::builtin().price(model).unwrap();
    cost(price, &usage(json)).to_string()
}

#[test]
fn the_builtin_catalog_parses_and_knows_the_common_models() {
    let c = Catalog::builtin();
    assert!(c.len() > 20, "{}", c.len());
    for m in [
        "gpt-4o",
        "gpt-4o-2024-08-06",
        "gpt-4o-mini",
        "gpt-5",
        "o3",
        "claude-sonnet-4-5",
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5",
        "gemini-2.5-pro",
        "deepseek-chat",
        "qwen-plus",
    ] {
        assert!(c.price(m).is_some(), "{m}");
    }
    // gpt-4o's glob does not reach gpt-4o-mini's dated names
    assert_eq!(c.price("gpt-4o-mini-2024-07-18"), c.price("gpt-4o-mini"));
    assert_eq!(c.price("my-fine-tune"), None, "unknown: no price, never 0");
}

#[test]
fn openai_cached_tokens_are_inside_the_prompt() {
    // 1200 prompt tokens of which 1024 cached, 30 out, at gpt-4o's 2.50 / 1.25 / 10.00:
    // 176 x 2.5 + 1024 x 1.25 + 30 x 10 = 2020 per million = $0.00202
    let c = priced(
        "gpt-4o",
        r#"{"prompt_tokens":1200,"completion_tokens":30,"total_tokens":1230,
            "prompt_tokens_details":{"cached_tokens":1024}}"#,
    );
    assert_eq!(c, "0.00202");
}

#[test]
fn anthropic_cache_tokens_are_apart_and_priced_each_their_own() {
    // 21 input x 3 + 100 written for 5 min x 3.75 + 88 for 1 h x 6 + 1024 read x 0.30
    // + 393 out x 15 = 7168.2 per million
    let c = priced(
        "claude-sonnet-4-5-20250929",
        r#"{"input_tokens":21,"cache_creation_input_tokens":188,"cache_read_input_tokens":1024,
            "cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":88},
            "output_tokens":393}"#,
    );
    assert_eq!(c, "0.0071682");
}

#[test]
fn a_long_prompt_is_priced_at_its_tier() {
    // above 200k input tokens Sonnet costs 6 / 22.50
    let c = priced(
        "claude-sonnet-4-5",
        r#"{"input_tokens":250000,"output_tokens":1000}"#,
    );
    assert_eq!(c, "1.5225");
    let c = priced(
        "claude-sonnet-4-5",
        r#"{"input_tokens":200000,"output_tokens":1000}"#,
    );
    assert_eq!(c, "0.615");
}

#[test]
fn sums_stay_exact() {
    // a million requests of 0.000000075 each: exactly 0.075, where f64 drifts
    let one = priced(
        "gpt-4o-mini",
        r#"{"prompt_tokens":1,"completion_tokens":0,"total_tokens":1}"#,
    );
    assert_eq!(one, "0.00000015");
    let price = Catalog::builtin().price("gpt-4o-mini").unwrap();
    let u = usage(r#"{"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":1}}"#);
    let mut total = Cost::default();
    for _ in 0..1_000_000 {
        total = total + cost(price, &u);
    }
    assert_eq!(total.to_string(), "0.075");
    assert_eq!(Cost::usd(12).to_string(), "12");
    assert_eq!(Cost(0).to_string(), "0");
    assert_eq!(Cost(1).decimal().as_str(), "0.000000000001");
    assert_eq!(Cost(3_450_000).decimal().as_str(), "0.00000345");
    assert_eq!(Cost(10_000_000_000_001).to_string(), "10.000000000001");
    let max = u128::MAX;
    let frac = format!("{:012}", max % Cost::PICO_PER_USD);
    let whole = max / Cost::PICO_PER_USD;
    assert_eq!(
        Cost(max).to_string(),
        format!("{whole}.{}", frac.trim_end_matches('0'))
    );
}

#[test]
fn a_discounted_key_and_bad_entries() {
    let price = Catalog::builtin().price("gpt-4o").unwrap().scaled(0.8);
    let c = cost(
        &price,
        &usage(r#"{"prompt_tokens":1000000,"completion_tokens":0,"total_tokens":1000000}"#),
    );
    assert_eq!(c.to_string(), "2");
    let err = Catalog::parse("models:\n  - {models: [m], input: -1, output: 1}\n").unwrap_err();
    assert!(err.to_string().contains("models[0]: input"), "{err}");
    let err = Catalog::parse("models:\n  - {models: [], input: 1, output: 1}\n").unwrap_err();
    assert!(err.to_string().contains("names no model"), "{err}");
    assert!(Catalog::parse("models:\n  - {models: [m], input: 1, output: 1, bogus: 2}\n").is_err());
}

#[test]
fn a_keys_prices_then_the_configs_then_the_builtin_ones() {
    use crate::{KeyPricing, Prices};
    let overrides = Catalog::parse(
        "models:\n  - {models: [\"gpt-4o*\"], input: 1, output: 2}\n  - {models: [house-model], input: 3, output: 3}\n",
    )
    .unwrap();
    let prices = Prices::new(overrides);
    let u =
        usage(r#"{"prompt_tokens":1000000,"completion_tokens":1000000,"total_tokens":2000000}"#);
    // the config's glob wins over the built-in exact name
    assert_eq!(prices.cost("gpt-4o", &u, None).unwrap().to_string(), "3");
    assert_eq!(
        prices.cost("house-model", &u, None).unwrap().to_string(),
        "6"
    );
    // not overridden: the built-in catalog (o3 is $2 + $8)
    assert_eq!(prices.cost("o3", &u, None).unwrap().to_string(), "10");
    assert_eq!(prices.cost("nobody-knows", &u, None), None);
    // a discounted key: 80% of whatever applies, in integers
    let discounted = KeyPricing {
        catalog: Catalog::default(),
        raw: Vec::new(),
        multiplier_ppm: KeyPricing::multiplier(0.8),
    };
    assert_eq!(
        prices
            .cost("o3", &u, Some(&discounted))
            .unwrap()
            .to_string(),
        "8"
    );
    let own = KeyPricing {
        catalog: Catalog::parse("models:\n  - {models: [o3], input: 0.5, output: 0.5}\n").unwrap(),
        raw: Vec::new(),
        multiplier_ppm: None,
    };
    assert_eq!(prices.cost("o3", &u, Some(&own)).unwrap().to_string(), "1");
    assert_eq!(KeyPricing::multiplier(-1.0), None);
    assert_eq!(KeyPricing::multiplier(f64::INFINITY), None);
    assert_eq!(Cost(1_499).nanos(), 1);
    assert_eq!(Cost(1_500).nanos(), 2);
}

#[test]
fn the_first_entry_naming_a_model_wins() {
    // the admin API's list goes before the file's in one list: its entries must win
    let c = Catalog::parse(
        "models:\n  - {models: [m, \"g*\"], input: 1, output: 1}\n  - {models: [m, \"g*\"], input: 2, output: 2}\n",
    )
    .unwrap();
    assert_eq!(c.price("m"), c.price("g1"));
    let u = usage(r#"{"prompt_tokens":1000000,"completion_tokens":0,"total_tokens":1000000}"#);
    assert_eq!(crate::cost(c.price("m").unwrap(), &u).to_string(), "1");
}
