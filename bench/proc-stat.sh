# Sourced by the bench scripts: a server's CPU from /proc, and waiting for it
# to exit.  They read $PID (the server) and $RT (the row's seconds).
HZ=$(getconf CLK_TCK)
# the server's CPU ticks (user + system)
cpu_ticks() { awk '{print $14+$15}' "/proc/$PID/stat" 2>/dev/null || echo 0; }
# per-thread CPU of the server, "FILE TICKS" per thread: compare two with
# top_thread to get the busiest thread's share of one CPU over a row (near
# 100: that loop is the bottleneck; well below: something else is)
thread_ticks() {
  local f
  for f in /proc/"$PID"/task/*/stat; do
    sed 's/^.*) //' "$f" 2>/dev/null | awk -v f="$f" '{print f, $12+$13}'
  done
}
top_thread() {   # top_thread BEFORE_FILE AFTER_FILE
  awk -v hz="$HZ" -v rt="$RT" 'NR==FNR {b[$1]=$2; next} {d=$2-b[$1]; if (d>m) m=d}
       END {printf "%.0f", 100*m/hz/rt}' "$1" "$2"
}
# Stop the server and wait for it.  A daemonized server is reparented to pid
# 1, which may reap it a second later: it has exited once it is a zombie.
kill_wait() {
  kill "$PID" 2>/dev/null
  while kill -0 "$PID" 2>/dev/null &&
        [ "$(awk '{print $3}' "/proc/$PID/stat" 2>/dev/null)" != Z ]; do sleep 0.05; done
  PID=
}
