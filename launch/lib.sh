# shellcheck shell=bash
# Shared by the launch scripts: `run` prints a command (with --dry_run) or runs it.

# The arguments as bash words: plain words as they are, anything else in single quotes, so a
# printed command pastes back into bash as exactly the same words.
quote() {
  local sep="" word
  for word in "$@"; do
    case "$word" in
      "" | *[!A-Za-z0-9_./:=@%+,-]*) printf "%s'%s'" "$sep" "${word//\'/\'\\\'\'}" ;;
      *) printf '%s%s' "$sep" "$word" ;;
    esac
    sep=" "
  done
}

# 1: `run` prints instead of running (the scripts' --dry_run).
dry_run=0

run() {
  if [ "$dry_run" = 1 ]; then
    quote "$@"
    printf '\n'
  else
    "$@"
  fi
}
