//! Bearer sessions of the member pages and the frontend API.

use crate::bindings::wxhost::plugin::session as host;
pub use crate::bindings::wxhost::plugin::session::{Issued, SessionError, SessionInfo};
use crate::{Error, Request, Result};

/// The signed-in user's openid: a missing, forged, expired or revoked token is a 401.
pub fn signed_in(req: &Request) -> Result<String> {
    Ok(session(req)?.openid)
}

/// The request's session.
pub fn session(req: &Request) -> Result<SessionInfo> {
    let token = req.bearer().ok_or_else(|| Error::unauthorized("sign in first"))?;
    Ok(host::verify(token)?)
}

/// Checks a token someone else holds (a business service asking whose it
/// is): the session, or why it is not one.
pub fn verify(token: &str) -> std::result::Result<SessionInfo, SessionError> {
    host::verify(token)
}

/// A new session for `openid`.
pub fn issue(openid: &str) -> Result<Issued> {
    Ok(host::issue(openid)?)
}

/// Ends the request's session (sign out).
pub fn revoke(req: &Request) -> Result<()> {
    let token = req.bearer().ok_or_else(|| Error::unauthorized("sign in first"))?;
    Ok(host::revoke(token)?)
}

/// The request carries the operator's admin credential (WXHOST_ADMIN_TOKEN):
/// 401 without a credential, 403 with another one.
pub fn require_admin(req: &Request) -> Result<()> {
    let credential = req.bearer().ok_or_else(|| Error::unauthorized("an admin credential is required"))?;
    if host::verify_admin(credential) {
        Ok(())
    } else {
        Err(Error::forbidden("this credential may not do this"))
    }
}
