//! One QMP connection's state machine: capabilities negotiation, request validation (QEMU's
//! `qmp_dispatch_check_obj` order and texts), named file descriptors.

use std::os::fd::OwnedFd;

use serde_json::{Map, Value};

pub use super::fds::Transport;
use super::{
    commands,
    fds::SessionFds,
    protocol::{self, QmpError},
};
use crate::daemon::Daemon;

#[derive(Debug)]
pub struct Session {
    negotiated: bool,
    oob: bool,
    /// The descriptors passed on this connection (`getfd`, `closefd`, netdevs' `fd=`).
    pub fds: SessionFds,
}

/// What the connection should do after a request.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub response: Value,
    /// Capabilities negotiation has just completed: start delivering events.
    pub negotiated_now: bool,
}

/// The members a request may have.
const EXECUTE: &str = "execute";
const EXEC_OOB: &str = "exec-oob";
const ARGUMENTS: &str = "arguments";
const ID: &str = "id";

impl Session {
    #[must_use]
    pub fn new(transport: Transport) -> Self {
        Self { negotiated: false, oob: false, fds: SessionFds::new(transport) }
    }

    /// fds that arrived with the last bytes read, or that the control message was truncated.
    pub fn receive_fds(&mut self, fds: Vec<OwnedFd>, truncated: bool) {
        self.fds.receive(fds, truncated);
    }

    /// Answers a JSON syntax error (no id: the request never parsed).
    #[must_use]
    pub fn syntax_error(desc: &str) -> Value {
        protocol::failure(&QmpError::generic(desc), None)
    }

    /// Validates and executes one request.
    pub async fn handle(&mut self, daemon: &Daemon, request: Value) -> Outcome {
        let Value::Object(request) = request else {
            return self.outcome(Err(QmpError::generic("QMP input must be a JSON object")), None);
        };
        let id = request.get(ID);
        let (name, arguments) = match self.check_request(&request) {
            Ok(parts) => parts,
            Err(error) => return self.outcome(Err(error), id),
        };
        let was_negotiated = self.negotiated;
        let result = self.execute(daemon, name, &arguments).await;
        let mut outcome = self.outcome(result, id);
        outcome.negotiated_now = !was_negotiated && self.negotiated;
        outcome
    }

    fn outcome(&self, result: Result<Value, QmpError>, id: Option<&Value>) -> Outcome {
        let response = match result {
            Ok(value) => protocol::success(value, id),
            Err(error) => protocol::failure(&error, id),
        };
        Outcome { response, negotiated_now: false }
    }

    /// `qmp_dispatch_check_obj` plus the OOB rules: returns the command name and its arguments.
    fn check_request<'r>(&self, request: &'r Map<String, Value>) -> Result<(&'r str, Value), QmpError> {
        for (key, value) in request {
            match key.as_str() {
                EXECUTE | EXEC_OOB if key == EXECUTE || self.oob => {
                    if !value.is_string() {
                        return Err(QmpError::generic(format!("QMP input member '{key}' must be a string")));
                    }
                }
                ARGUMENTS if !value.is_object() => {
                    return Err(QmpError::generic("QMP input member 'arguments' must be an object"));
                }
                ARGUMENTS | ID => {}
                _ => return Err(QmpError::generic(format!("QMP input member '{key}' is unexpected"))),
            }
        }
        let execute = request.get(EXECUTE).and_then(Value::as_str);
        let exec_oob = request.get(EXEC_OOB).and_then(Value::as_str);
        let name = match (execute, exec_oob) {
            (Some(_), Some(_)) => return Err(QmpError::generic("QMP input member 'execute' clashes with 'exec-oob'")),
            (None, None) => return Err(QmpError::generic("QMP input lacks member 'execute'")),
            (Some(name), None) => name,
            (None, Some(name)) => {
                // No netdevd command needs to overtake queued ones.
                if commands::exists(name) {
                    return Err(QmpError::generic(format!("The command {name} does not support OOB")));
                }
                name
            }
        };
        let arguments = request.get(ARGUMENTS).cloned().unwrap_or_else(|| Value::Object(Map::new()));
        Ok((name, arguments))
    }

    async fn execute(&mut self, daemon: &Daemon, name: &str, arguments: &Value) -> Result<Value, QmpError> {
        if !self.negotiated && name != commands::QMP_CAPABILITIES {
            return Err(QmpError::command_not_found("Expecting capabilities negotiation with 'qmp_capabilities'"));
        }
        if self.negotiated && name == commands::QMP_CAPABILITIES {
            return Err(QmpError::command_not_found("Capabilities negotiation is already complete, command ignored"));
        }
        if name == commands::QMP_CAPABILITIES {
            let oob = commands::capabilities_oob(arguments)?;
            self.negotiate(oob);
            return Ok(Value::Object(Map::new()));
        }
        commands::execute(daemon, &mut self.fds, name, arguments).await
    }

    /// `qmp_capabilities`: completes negotiation, with OOB if asked for.
    pub fn negotiate(&mut self, oob: bool) {
        self.negotiated = true;
        self.oob = oob;
    }

    /// The commands this session may run now (`query-commands`).
    #[must_use]
    pub fn available_commands(&self) -> Vec<&'static str> {
        if self.negotiated { commands::ALL.to_vec() } else { vec![commands::QMP_CAPABILITIES] }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    async fn run(session: &mut Session, daemon: &Daemon, request: Value) -> Value {
        session.handle(daemon, request).await.response
    }

    fn desc(response: &Value) -> &str {
        response["error"]["desc"].as_str().unwrap_or_default()
    }

    #[tokio::test]
    async fn negotiation() {
        let daemon = Daemon::new(None);
        let mut session = Session::new(Transport::Unix);
        let r = run(&mut session, &daemon, json!({"execute": "query-version"})).await;
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(desc(&r), "Expecting capabilities negotiation with 'qmp_capabilities'");
        let outcome = session.handle(&daemon, json!({"execute": "qmp_capabilities", "id": {"a": [1]}})).await;
        assert_eq!(outcome.response, json!({"return": {}, "id": {"a": [1]}}));
        assert!(outcome.negotiated_now);
        let r = run(&mut session, &daemon, json!({"execute": "qmp_capabilities"})).await;
        assert_eq!(desc(&r), "Capabilities negotiation is already complete, command ignored");
    }

    #[tokio::test]
    async fn request_shape_errors() {
        let daemon = Daemon::new(None);
        let mut session = Session::new(Transport::Unix);
        let cases = [
            (json!([1]), "QMP input must be a JSON object"),
            (json!({"execute": 1}), "QMP input member 'execute' must be a string"),
            (json!({"execute": "x", "arguments": []}), "QMP input member 'arguments' must be an object"),
            (json!({"arguments": {}}), "QMP input lacks member 'execute'"),
            (json!({"execute": "x", "bogus": 1}), "QMP input member 'bogus' is unexpected"),
            (json!({"exec-oob": "x"}), "QMP input member 'exec-oob' is unexpected"),
        ];
        for (request, expected) in cases {
            assert_eq!(desc(&run(&mut session, &daemon, request.clone()).await), expected, "{request}");
        }
        // With OOB negotiated, exec-oob is known but no command supports it.
        run(&mut session, &daemon, json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})).await;
        let r = run(&mut session, &daemon, json!({"exec-oob": "query-version", "id": 1})).await;
        assert_eq!(desc(&r), "The command query-version does not support OOB");
        assert_eq!(r["id"], 1);
        let r = run(&mut session, &daemon, json!({"exec-oob": "a", "execute": "b"})).await;
        assert_eq!(desc(&r), "QMP input member 'execute' clashes with 'exec-oob'");
    }

    #[tokio::test]
    async fn getfd_without_fd() {
        let daemon = Daemon::new(None);
        let mut session = Session::new(Transport::Unix);
        session.negotiate(false);
        let r = run(&mut session, &daemon, json!({"execute": "getfd", "arguments": {"fdname": "f"}})).await;
        assert_eq!(desc(&r), "No file descriptor supplied via SCM_RIGHTS");
        let r = run(&mut session, &daemon, json!({"execute": "getfd", "arguments": {"fdname": "1f"}})).await;
        assert_eq!(desc(&r), "No file descriptor supplied via SCM_RIGHTS");
        session.receive_fds(vec![OwnedFd::from(std::fs::File::open("/dev/null").unwrap())], false);
        let r = run(&mut session, &daemon, json!({"execute": "getfd", "arguments": {"fdname": "1f"}})).await;
        assert_eq!(desc(&r), "Parameter 'fdname' expects a name not starting with a digit");
        // The refused fd was consumed.
        let r = run(&mut session, &daemon, json!({"execute": "getfd", "arguments": {"fdname": "g"}})).await;
        assert_eq!(desc(&r), "No file descriptor supplied via SCM_RIGHTS");
        let r = run(&mut session, &daemon, json!({"execute": "closefd", "arguments": {"fdname": "f"}})).await;
        assert_eq!(desc(&r), "File descriptor named 'f' not found");
        assert_eq!(
            session.fds.take_fd("nope").unwrap_err().0,
            "File descriptor named 'nope' has not been found"
        );
    }

    #[tokio::test]
    async fn getfd_names_received_fd() {
        let daemon = Daemon::new(None);
        let mut session = Session::new(Transport::Unix);
        session.negotiate(false);
        let file = std::fs::File::open("/dev/null").unwrap();
        session.receive_fds(vec![OwnedFd::from(file)], false);
        let r = run(&mut session, &daemon, json!({"execute": "getfd", "arguments": {"fdname": "f"}})).await;
        assert_eq!(r, json!({"return": {}}));
        assert_eq!(session.fds.names().count(), 1);
        assert!(matches!(session.fds.take_fd("f"), Ok(crate::fd::FdParam::Named(_))));
        assert_eq!(session.fds.names().count(), 0);
    }
}
