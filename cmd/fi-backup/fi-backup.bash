# bash completion for fi-backup(8).
# Installed by `make install` as $(PREFIX)/share/bash-completion/completions/fi-backup;
# needs nothing but bash (the bash-completion package is optional).
# Domain names come from `virsh list --all --name` (on $FI_BACKUP_URI when set).

_fi_backup_domains() {
	local cur=$1 name
	local -a uri=()
	[ -n "${FI_BACKUP_URI-}" ] && uri=(-c "$FI_BACKUP_URI")
	[[ all == "$cur"* ]] && COMPREPLY+=(all)
	while IFS= read -r name; do
		[ -n "$name" ] && [[ $name == "$cur"* ]] && COMPREPLY+=("$(printf '%q' "$name")")
	done < <(virsh "${uri[@]}" -q list --all --name 2>/dev/null)
}

_fi_backup() {
	local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]} opt="" prefix=""
	local IFS=$' \t\n'
	COMPREPLY=()

	# Short options (a trailing ':' takes an argument) and long options (a
	# trailing '=' takes one), as in internal/cli's options table.
	local shorts='b:cCm:qrs:dhVv'
	local longs='backup_dir= consolidate_only consolidate_and_snapshot method= quiesce
		all_running dump_state_dir= debug help version verbose job_timeout= rate_limit=
		keep= cbt parallel= report= textfile_dir= list verify restore= target_dir= format='

	# After "--" every word is a domain.
	local i
	for ((i = 1; i < COMP_CWORD; i++)); do
		if [[ ${COMP_WORDS[i]} == -- ]]; then
			_fi_backup_domains "$cur"
			return 0
		fi
	done

	# The option whose value is being completed: "--opt=val" as one word,
	# "--opt" "=" "val" when '=' is in COMP_WORDBREAKS, "--opt val", "-b val",
	# or a bundle ending in an option that takes an argument ("-db val").
	if [[ $cur == --*=* ]]; then
		opt=${cur%%=*} prefix=${opt}= cur=${cur#*=}
	elif [[ $cur == = && $prev == --* ]]; then
		opt=$prev cur=""
	elif [[ $prev == = && $COMP_CWORD -ge 2 && ${COMP_WORDS[COMP_CWORD - 2]} == --* ]]; then
		opt=${COMP_WORDS[COMP_CWORD - 2]}
	elif [[ $prev == --?* ]]; then
		opt=$prev
	else
		local flags=${shorts//?:/} args="" k
		for ((k = 0; k < ${#shorts}; k++)); do
			[[ ${shorts:k+1:1} == : ]] && args+=${shorts:k:1}
		done
		[[ $prev =~ ^-[$flags]*[$args]$ ]] && opt=-${prev: -1}
	fi

	# A long option is named by any unambiguous prefix (getopt's rule).
	if [[ $opt == --* ]]; then
		local want=${opt#--} l match="" n=0
		for l in $longs; do
			if [[ ${l%=} == "$want" ]]; then
				match=$l n=1
				break
			fi
			[[ $l == "$want"* ]] && match=$l n=$((n + 1))
		done
		if [ "$n" = 1 ] && [[ $match == *= ]]; then
			opt=--${match%=}
		elif [ -n "$prefix" ]; then
			return 0 # "--flag=…" or an unknown option: nothing to offer
		else
			opt="" # a flag: the current word is a new argument
		fi
	fi

	local w
	case $opt in
	-b | -s | --backup_dir | --dump_state_dir | --target_dir | --textfile_dir)
		compopt -o filenames 2>/dev/null
		while IFS= read -r w; do COMPREPLY+=("$prefix$w"); done < <(compgen -d -- "$cur")
		return 0
		;;
	--report)
		compopt -o filenames 2>/dev/null
		while IFS= read -r w; do COMPREPLY+=("$prefix$w"); done < <(compgen -f -- "$cur")
		return 0
		;;
	-m | --method)
		for w in blockcommit blockpull; do [[ $w == "$cur"* ]] && COMPREPLY+=("$prefix$w"); done
		return 0
		;;
	--format)
		for w in text json; do [[ $w == "$cur"* ]] && COMPREPLY+=("$prefix$w"); done
		return 0
		;;
	--restore)
		[[ latest == "$cur"* ]] && COMPREPLY+=("${prefix}latest")
		return 0
		;;
	--?*)
		return 0 # a number, a duration or a rate: nothing to offer
		;;
	esac

	case $cur in
	--*)
		for w in $longs; do
			w=--${w%=}
			[[ $w == "$cur"* ]] && COMPREPLY+=("$w")
		done
		;;
	-*)
		local k
		for ((k = 0; k < ${#shorts}; k++)); do
			w=-${shorts:k:1}
			[[ $w != -: && $w == "$cur"* ]] && COMPREPLY+=("$w")
		done
		[[ $cur == - ]] && for w in $longs; do COMPREPLY+=("--${w%=}"); done
		;;
	*)
		_fi_backup_domains "$cur"
		;;
	esac
	return 0
}

complete -F _fi_backup fi-backup
