//! The recipes of examples/, each proved end to end through the real Envoy, ratelimitd and
//! redis-server with the recipe's own files (tests/support/recipe.rs starts them as shipped),
//! and every recipe's Envoy config and rules validated as CI must validate them.
#![allow(clippy::unwrap_used)]

mod support;

#[path = "recipes/api_key_token_bucket.rs"]
mod api_key_token_bucket;
#[path = "recipes/client_ip_behind_proxies.rs"]
mod client_ip_behind_proxies;
#[path = "recipes/cost_budgets.rs"]
mod cost_budgets;
#[path = "recipes/global_cap.rs"]
mod global_cap;
#[path = "recipes/jwt_tiers.rs"]
mod jwt_tiers;
#[path = "recipes/public_widget.rs"]
mod public_widget;
#[path = "recipes/several_windows.rs"]
mod several_windows;

use support::{envoy_validate, recipe, run_cli_env};

/// Every recipe, in the README's order.
const RECIPES: [&str; 7] = [
    "api-key-token-bucket",
    "client-ip-behind-proxies",
    "jwt-tiers",
    "several-windows",
    "cost-budgets",
    "public-widget",
    "global-cap",
];

#[test]
fn every_recipe_has_its_files_and_nothing_else_is_in_examples() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut found: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    found.sort();
    let mut expected = RECIPES.map(str::to_owned).to_vec();
    expected.sort();
    assert_eq!(found, expected);
    for name in RECIPES {
        let dir = recipe::dir(name);
        for file in ["envoy.yaml", "README.md", "ratelimitd.env"] {
            assert!(dir.join(file).is_file(), "{name}: no {file}");
        }
        assert!(
            rule_files(name) > 0,
            "{name}: no rules/*.yaml (the rule files ratelimitd loads)"
        );
    }
}

fn rule_files(name: &str) -> usize {
    std::fs::read_dir(recipe::dir(name).join("rules"))
        .map(|d| {
            d.filter(|e| {
                let p = e.as_ref().unwrap().path();
                matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .count()
        })
        .unwrap_or(0)
}

#[test]
fn every_recipe_envoy_config_passes_envoy_validate() {
    for name in RECIPES {
        envoy_validate(&recipe::dir(name).join("envoy.yaml"));
    }
}

#[test]
fn every_recipe_rule_directory_passes_check_config_with_its_settings() {
    for name in RECIPES {
        let rules = recipe::dir(name).join("rules");
        let settings = recipe::settings(name);
        let env: Vec<(&str, &str)> = settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (code, out, err) =
            run_cli_env(&["check-config", "--config", rules.to_str().unwrap()], &env);
        assert_eq!(code, 0, "{name}: {out}{err}");
        assert!(
            out.contains(&format!("config OK: {} file(s)", rule_files(name))),
            "{name}: {out}"
        );
    }
}

#[test]
fn the_readme_links_every_recipe_under_recipes() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let (_, section) = readme
        .split_once("\n## Recipes\n")
        .expect("README.md has a `## Recipes` heading");
    let section = section.split("\n## ").next().unwrap();
    for name in RECIPES {
        let link = format!("](examples/{name}/)");
        assert_eq!(
            section.matches(&link).count(),
            1,
            "README's Recipes section links examples/{name}/ exactly once"
        );
    }
}
