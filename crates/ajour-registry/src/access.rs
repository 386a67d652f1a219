//! Where users' access tokens and applications' owners and members are kept: [`AccessStore`],
//! in Ajour's own database (also in Drogue mode, beside Drogue's registry). The rules of who may
//! do what are `ajour_types::access`'s; a store keeps what they read.
//!
//! Tokens are kept as their SHA-256 hash with a short public prefix to find them by: a token is
//! shown once, when it is made, and cannot be read back.

use crate::{AppName, RegistryError};
use ajour_types::access::{AppAccess, Role};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};

/// An access token as stored: everything but the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// Public, unique: shown in listings and used to delete the token.
    pub prefix: String,
    pub user: String,
    /// Hex SHA-256 of the whole token.
    pub hash: String,
    pub description: Option<String>,
    /// RFC 3339.
    pub created: String,
}

#[async_trait]
pub trait AccessStore: Send + Sync + 'static {
    /// Store a new token; [`RegistryError::AlreadyExists`] if its prefix is taken.
    async fn add_token(&self, token: &StoredToken) -> Result<(), RegistryError>;
    /// The token with this prefix.
    async fn token(&self, prefix: &str) -> Result<Option<StoredToken>, RegistryError>;
    /// A user's tokens, oldest first.
    async fn tokens(&self, user: &str) -> Result<Vec<StoredToken>, RegistryError>;
    /// Delete a user's token; whether there was one.
    async fn delete_token(&self, user: &str, prefix: &str) -> Result<bool, RegistryError>;

    /// The application's owner and members; `None` when none were ever set (created with the
    /// bootstrap token, or before users existed).
    async fn app_access(&self, app: &AppName) -> Result<Option<AppAccess>, RegistryError>;
    /// A newly created application: `owner` owns it, with no members and no transfer, whatever
    /// an earlier application of that name had.
    async fn claim_app(&self, app: &AppName, owner: Option<&str>) -> Result<(), RegistryError>;
    /// Replace the members; [`RegistryError::Conflict`] when `revision` is given and is not the
    /// stored one.
    async fn set_members(
        &self,
        app: &AppName,
        members: &BTreeMap<String, Role>,
        revision: Option<&str>,
    ) -> Result<(), RegistryError>;
    /// Offer the application to `user` (`None`: withdraw the offer).
    async fn offer_app(&self, app: &AppName, user: Option<&str>) -> Result<(), RegistryError>;
    /// Make `user` the owner if the application was offered to them; whether it was.
    async fn accept_app(&self, app: &AppName, user: &str) -> Result<bool, RegistryError>;
    /// The application was deleted: forget its owner and members.
    async fn forget_app(&self, app: &AppName) -> Result<(), RegistryError>;
    /// The applications `user` owns or is a member of.
    async fn apps_of(&self, user: &str) -> Result<BTreeSet<String>, RegistryError>;
}
