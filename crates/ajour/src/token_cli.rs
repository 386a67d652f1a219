//! `ajour token create|list|delete`: users' access tokens through the token API
//! (`/api/tokens/v1alpha1`; see docs/drogue-tools.md). With the bootstrap token, `--user` says
//! whose: that is how a user gets a first token, to log in with `drg` and make more themselves.

use crate::cli::Connection;
use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

const TOKEN_API: &str = "api/tokens/v1alpha1";

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make an access token; it is printed once, and only its hash is kept.
    Create {
        /// Whose token (needed with the bootstrap token; a user's own token makes their own).
        #[arg(long)]
        user: Option<String>,
        /// What the token is for, shown in listings.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// List access tokens by prefix, age and description.
    List {
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete an access token by its prefix; requests with it are refused at once.
    Delete {
        prefix: String,
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
}

fn query(user: &Option<String>, description: &Option<String>) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    if let Some(user) = user {
        query.push(("user", user.clone()));
    }
    if let Some(description) = description {
        query.push(("description", description.clone()));
    }
    query
}

pub async fn run(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            user,
            description,
            connection,
        } => {
            let created = connection
                .client()?
                .call(TOKEN_API, Method::POST, "", &query(&user, &description), None)
                .await?;
            let token = created["token"].as_str().unwrap_or_default();
            let who = user.as_deref().unwrap_or("you");
            println!("{token}");
            eprintln!(
                "An access token for {who} (prefix {}): save it now, it cannot be shown again. \
                 Log in with: drg login {} --access-token {}:{token}",
                created["prefix"].as_str().unwrap_or_default(),
                connection.url,
                user.as_deref().unwrap_or("USER"),
            );
        }
        TokenCommand::List { user, connection } => {
            let tokens = connection
                .client()?
                .call(TOKEN_API, Method::GET, "", &query(&user, &None), None)
                .await?;
            println!("{:<10} {:<22} DESCRIPTION", "PREFIX", "CREATED");
            for token in tokens.as_array().into_iter().flatten() {
                let text = |key: &str| token[key].as_str().unwrap_or_default().to_string();
                println!(
                    "{:<10} {:<22} {}",
                    text("prefix"),
                    text("created"),
                    text("description")
                );
            }
        }
        TokenCommand::Delete {
            prefix,
            user,
            connection,
        } => {
            anyhow::ensure!(
                !prefix.is_empty() && prefix.chars().all(|c| c.is_ascii_alphanumeric()),
                "a token prefix is letters and digits, as `ajour token list` shows it"
            );
            let _: Value = connection
                .client()?
                .call(TOKEN_API, Method::DELETE, &prefix, &query(&user, &None), None)
                .await?;
            println!("deleted access token {prefix}");
        }
    }
    Ok(())
}
