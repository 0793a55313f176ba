//! Hand-written SQL that diesel caches as a prepared statement.
//!
//! `diesel::sql_query` is parsed and planned by the server on every call,
//! which costs more than the work itself for the relay's hot statements
//! (claim and settle, once per batch). A [`Prepared`] statement has a static
//! query id, so each connection prepares it once and then only binds and
//! executes it.

use std::marker::PhantomData;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::Untyped;
use diesel::{QueryResult, RunQueryDsl};

/// Pushes one bind parameter; implemented by each statement's binds.
pub(crate) trait Binds {
    /// Pushes the value of `$n` (1-based).
    fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()>;
}

/// A statement: SQL with `$1 … $n` placeholders, and its binds. `Id` is a
/// marker type unique to the statement (diesel's cache key).
pub(crate) struct Prepared<Id, B> {
    sql: &'static str,
    binds: B,
    _id: PhantomData<Id>,
}

impl<Id, B> Prepared<Id, B> {
    pub(crate) fn new(sql: &'static str, binds: B) -> Self {
        Prepared {
            sql,
            binds,
            _id: PhantomData,
        }
    }
}

impl<Id: 'static, B> QueryId for Prepared<Id, B> {
    type QueryId = Id;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<Id, B: Binds> QueryFragment<Pg> for Prepared<Id, B> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // Each `$n` becomes a bind parameter (diesel numbers them again, in
        // order of appearance); everything else is SQL text.
        let mut rest = self.sql;
        while let Some(dollar) = rest.find('$') {
            out.push_sql(&rest[..dollar]);
            let digits = rest[dollar + 1..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len() - dollar - 1);
            let n: usize = rest[dollar + 1..dollar + 1 + digits].parse().map_err(|_| {
                diesel::result::Error::QueryBuilderError("`$` without a parameter number".into())
            })?;
            self.binds.push(n, &mut out)?;
            rest = &rest[dollar + 1 + digits..];
        }
        out.push_sql(rest);
        Ok(())
    }
}

impl<Id, B> Query for Prepared<Id, B> {
    type SqlType = Untyped;
}

impl<Id, B, Conn> RunQueryDsl<Conn> for Prepared<Id, B> {}

/// The error for a statement asked for a parameter it does not have.
pub(super) fn unknown_parameter(n: usize) -> diesel::result::Error {
    diesel::result::Error::QueryBuilderError(format!("statement has no parameter ${n}").into())
}
