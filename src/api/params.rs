//! Query parameters shared by the list routes: `limit` and `status`, checked
//! the same way everywhere (a clear `invalid_request` naming the parameter).

use crate::error::{ApiError, ApiResult, Code};
use crate::store::Status;

/// A `limit` query parameter: a positive integer, capped at `max`; absent or
/// empty is `default`.
pub fn parse_limit(text: Option<&str>, default: usize, max: usize) -> ApiResult<usize> {
    match text.map(str::trim) {
        None | Some("") => Ok(default),
        Some(text) => text.parse::<usize>().ok().filter(|n| *n > 0).map(|n| n.min(max)).ok_or_else(|| {
            ApiError::new(Code::InvalidRequest, format!("`limit` must be a positive integer, got `{text}`"))
        }),
    }
}

/// A `status` query parameter: one of the request statuses; absent or empty is none.
pub fn parse_status(text: Option<&str>) -> ApiResult<Option<Status>> {
    match text.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => Status::parse(text).map(Some).ok_or_else(|| {
            ApiError::new(
                Code::InvalidRequest,
                format!("`status` must be one of pending, processing, completed, failed, cancelled; got `{text}`"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_positive_and_capped() {
        assert_eq!(parse_limit(None, 50, 500).unwrap(), 50);
        assert_eq!(parse_limit(Some("7"), 50, 500).unwrap(), 7);
        assert_eq!(parse_limit(Some("99999999999999999999999"), 50, 500).unwrap_err().code, Code::InvalidRequest);
        assert_eq!(parse_limit(Some("100000"), 50, 500).unwrap(), 500);
        for bad in ["0", "-1", "x", "1.5"] {
            assert_eq!(parse_limit(Some(bad), 50, 500).unwrap_err().code, Code::InvalidRequest, "{bad}");
        }
    }

    #[test]
    fn statuses_are_the_request_statuses() {
        assert_eq!(parse_status(Some("failed")).unwrap(), Some(Status::Failed));
        assert_eq!(parse_status(Some("")).unwrap(), None);
        assert_eq!(parse_status(Some("done")).unwrap_err().code, Code::InvalidRequest);
    }
}
