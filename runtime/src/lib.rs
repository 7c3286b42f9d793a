//! agentvm runtime.
