# Sourced by the scripts that start long-lived daemons (docker-up.sh, cri-up.sh). The daemons
# outlive the script and the checkout it runs from: they must not inherit AGENTVM_* settings
# that point into it (every later shim would use them), nor any descriptor beyond stdio (a
# caller's lock file would stay locked while they run). Start them as
#   (close_fds; exec "${clean_env[@]}" DAEMON ...)
clean_env=(env)
for v in ${!AGENTVM_@}; do clean_env+=(-u "$v"); done
close_fds() {
  local fd
  for fd in /proc/self/fd/*; do
    fd=${fd##*/}
    [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null
  done
  return 0
}
