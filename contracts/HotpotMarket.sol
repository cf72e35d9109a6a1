// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title Hotpot's market: gateway deposits, node stakes, settlement of what
/// gateways owe nodes, and k-of-n slashing on any EVM chain.
///
/// Who is who. A *gateway* sells inference to users and owes nodes for the
/// work they did; it keeps a deposit here that backs what it owes. A *node*
/// runs blocks of a model for gateways and keeps a stake here that it loses
/// if it is caught cheating. Registered gateways are also the *auditors*:
/// they re-run a node's work, and a slash needs `quorum` of them to sign the
/// same conviction. The deployer (`owner`) registers gateways; on a public
/// deployment that should be a multisig or a governance contract.
///
/// Currency: the chain's native coin (ETH on Ethereum and its rollups, the
/// test coin on anvil). Why: every EVM chain has one, so there is no token
/// contract to deploy, trust or approve, and a stake, a deposit and a payout
/// are each one plain transfer. Off chain Hotpot counts micro-credits; one
/// micro-credit is `weiPerMicroCredit` wei, fixed at deployment, so a voucher
/// signed in credits means the same amount of coin to everyone.
///
/// What a gateway signs is a *voucher*: the running total of everything it
/// owes one node, raised by each of Hotpot's off-chain receipts (one per
/// session and node). The node keeps the latest; settling it pays the part
/// of the total not paid yet on that (gateway, node) pair. So one
/// settlement pays any number of receipts for the cost of one signature
/// check and two storage writes, which is what keeps settling cheap next to
/// what a node earns, and a voucher that is stale (its total already paid)
/// is refused like a receipt settled twice.
///
/// What is off chain: sessions, audits and evidence files. A conviction
/// names the evidence by its hash; each auditor re-ran the evidence before
/// signing.
///
/// Money paid out is never pushed to an address inside another call:
/// settlement credits the (gateway, node) pair and slashing credits the
/// accuser's `earningsOf`, which their owner claims (`claim`), so one
/// receiver can never make a batch fail.
contract HotpotMarket {
    // ------------------------------------------------------------------
    // Configuration, fixed at deployment
    // ------------------------------------------------------------------

    /// Registers and removes gateways (auditors).
    address public immutable owner;
    /// Seconds between `requestUnstake` (or `requestDepositWithdrawal`)
    /// and the withdrawal; the amount stays slashable (or payable to nodes)
    /// until then.
    uint256 public immutable unbondingDelay;
    /// How many registered auditors must sign a conviction to slash.
    uint256 public immutable quorum;
    /// Parts per million of a slashed stake that go to the accuser; the rest
    /// is burned (kept in this contract for ever, counted in `burned`).
    uint256 public immutable accuserSharePpm;
    /// Wei per off-chain micro-credit.
    uint256 public immutable weiPerMicroCredit;

    // ------------------------------------------------------------------
    // State
    // ------------------------------------------------------------------

    /// An amount on its way out, withdrawable from `readyAt` (Unix seconds).
    struct Pending {
        uint256 amount;
        uint256 readyAt;
    }

    /// A gateway's free deposit and whether it is registered: one storage
    /// slot, since a settlement reads both.
    struct Gateway {
        uint128 deposit;
        bool registered;
    }

    mapping(address => Gateway) private gateways;
    uint256 public gatewayCount;
    mapping(address => uint256) private stakes;
    /// Stake on its way out (still slashable).
    mapping(address => Pending) public unstaking;
    /// Deposit on its way out (still pays vouchers).
    mapping(address => Pending) public withdrawing;
    /// Accusers' shares of slashes, not yet claimed.
    mapping(address => uint256) public earningsOf;

    /// One (gateway, node) pair: the micro-credits paid so far (the total
    /// of the last voucher settled) and the wei settled to the node and not
    /// claimed yet. One storage slot, so settling a voucher writes one slot.
    struct Pair {
        uint64 paid;
        uint192 unclaimed;
    }

    /// The pairs, by key (`pairKey`).
    mapping(bytes24 => Pair) private pairs;
    /// Convictions already slashed (by their EIP-712 struct hash).
    mapping(bytes32 => bool) public slashed;
    /// Wei destroyed by slashing.
    uint256 public burned;

    // ------------------------------------------------------------------
    // Signed messages (EIP-712)
    // ------------------------------------------------------------------

    /// What a gateway signs for a node: "I have owed `node` `total`
    /// micro-credits in all, from my deposit". Its id (`voucherId`) is the
    /// pair's key followed by the total.
    struct Voucher {
        address node;
        address gateway;
        uint64 total;
    }

    /// An ECDSA signature (v is 27 or 28).
    struct Sig {
        bytes32 r;
        bytes32 s;
        uint8 v;
    }

    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant VOUCHER_TYPEHASH = keccak256("Voucher(address node,address gateway,uint64 total)");
    bytes32 private constant CONVICTION_TYPEHASH =
        keccak256("Conviction(address node,bytes32 model,bytes32 evidence)");
    /// secp256k1's order / 2: larger `s` values are the malleable twins.
    uint256 private constant HALF_ORDER = 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    // ------------------------------------------------------------------
    // Events and errors
    // ------------------------------------------------------------------

    event GatewaySet(address indexed gateway, bool registered);
    event Deposited(address indexed gateway, uint256 amount);
    event DepositWithdrawalRequested(address indexed gateway, uint256 amount, uint256 readyAt);
    event Staked(address indexed node, uint256 amount);
    event UnstakeRequested(address indexed node, uint256 amount, uint256 readyAt);
    event Withdrawn(address indexed who, uint256 amount);
    event Settled(bytes32 indexed id, address indexed node, address indexed gateway, uint256 amount);
    event Claimed(address indexed who, uint256 amount);
    event Slashed(address indexed node, bytes32 indexed conviction, address indexed accuser, uint256 amount, uint256 share);

    error NotOwner();
    error NotGateway(address who);
    error AlreadySettled(bytes32 id);
    error BadSignature(bytes32 id, address signer);
    error InsufficientDeposit(address gateway, uint256 available, uint256 needed);
    error LengthMismatch();
    error NotReady(uint256 readyAt);
    error Nothing();
    error TooMuch(uint256 available, uint256 asked);
    error UnsortedSigners();
    error TooFewSignatures(uint256 valid, uint256 needed);
    error AlreadySlashed(bytes32 conviction);
    error TransferFailed();

    constructor(uint256 unbondingDelay_, uint256 quorum_, uint256 accuserSharePpm_, uint256 weiPerMicroCredit_) {
        require(quorum_ > 0 && accuserSharePpm_ <= 1_000_000 && weiPerMicroCredit_ > 0, "bad configuration");
        owner = msg.sender;
        unbondingDelay = unbondingDelay_;
        quorum = quorum_;
        accuserSharePpm = accuserSharePpm_;
        weiPerMicroCredit = weiPerMicroCredit_;
    }

    // ------------------------------------------------------------------
    // Registration
    // ------------------------------------------------------------------

    /// Registers (or removes) a gateway, which also makes it an auditor.
    function setGateway(address gateway, bool registered) external {
        if (msg.sender != owner) revert NotOwner();
        if (gateways[gateway].registered != registered) {
            gateways[gateway].registered = registered;
            if (registered) gatewayCount += 1;
            else gatewayCount -= 1;
        }
        emit GatewaySet(gateway, registered);
    }

    // ------------------------------------------------------------------
    // Deposits (gateways) and stakes (nodes)
    // ------------------------------------------------------------------

    function deposit() external payable {
        if (msg.value == 0) revert Nothing();
        Gateway storage g = gateways[msg.sender];
        uint256 total = g.deposit + msg.value;
        if (total > type(uint128).max) revert TooMuch(type(uint128).max - g.deposit, msg.value);
        g.deposit = uint128(total);
        emit Deposited(msg.sender, msg.value);
    }

    /// Starts taking `amount` of the caller's deposit out. Vouchers may still
    /// draw on it until `withdrawDeposit` (a gateway cannot run off with
    /// what it owes before its nodes had the delay to settle).
    function requestDepositWithdrawal(uint256 amount) external {
        Pending storage p = withdrawing[msg.sender];
        Gateway storage g = gateways[msg.sender];
        g.deposit = uint128(_startLeaving(g.deposit, amount, p));
        emit DepositWithdrawalRequested(msg.sender, amount, p.readyAt);
    }

    function withdrawDeposit() external {
        _payOut(withdrawing[msg.sender]);
    }

    function stake() external payable {
        if (msg.value == 0) revert Nothing();
        stakes[msg.sender] += msg.value;
        emit Staked(msg.sender, msg.value);
    }

    /// Starts taking `amount` of the caller's stake out; it stays slashable
    /// for `unbondingDelay` seconds (a new request restarts the delay).
    function requestUnstake(uint256 amount) external {
        Pending storage p = unstaking[msg.sender];
        stakes[msg.sender] = _startLeaving(stakes[msg.sender], amount, p);
        emit UnstakeRequested(msg.sender, amount, p.readyAt);
    }

    /// Moves `amount` of `have` into `p` (restarting its delay); returns
    /// what is left of `have`.
    function _startLeaving(uint256 have, uint256 amount, Pending storage p) private returns (uint256) {
        if (amount == 0) revert Nothing();
        if (amount > have) revert TooMuch(have, amount);
        p.amount += amount;
        p.readyAt = block.timestamp + unbondingDelay;
        return have - amount;
    }

    /// Pays out the caller's unstaked amount once its delay has passed.
    function withdraw() external {
        _payOut(unstaking[msg.sender]);
    }

    function _payOut(Pending storage p) private {
        uint256 amount = p.amount;
        if (amount == 0) revert Nothing();
        if (block.timestamp < p.readyAt) revert NotReady(p.readyAt);
        p.amount = 0;
        emit Withdrawn(msg.sender, amount);
        _send(msg.sender, amount);
    }

    // ------------------------------------------------------------------
    // Settlement
    // ------------------------------------------------------------------

    /// Pays a batch of gateway-signed vouchers: for each, what its total
    /// adds to what was paid on its (gateway, node) pair, from the gateway's
    /// deposit to the node (claimable from the pair). Anyone may submit (the node itself,
    /// without the gateway's goodwill). A voucher whose total is already
    /// paid (settled twice, or older than one settled), a signature that is
    /// not its gateway's, or a gateway that is not registered reverts the
    /// whole batch, naming the voucher. A gateway settling its own vouchers
    /// needs no signatures on them (its transaction is signed): their
    /// `Sig`s are not read.
    function settle(Voucher[] calldata vouchers, Sig[] calldata sigs) external {
        if (vouchers.length != sigs.length) revert LengthMismatch();
        bytes32 domain = _domainSeparator();
        for (uint256 i = 0; i < vouchers.length; i++) {
            Voucher calldata v = vouchers[i];
            bytes24 pair = pairKey(v.gateway, v.node);
            bytes32 id = _voucherId(pair, v.total);
            Pair memory before = pairs[pair];
            if (v.total <= before.paid) revert AlreadySettled(id);
            if (msg.sender != v.gateway) {
                bytes32 digest = _digest(domain, keccak256(abi.encode(VOUCHER_TYPEHASH, v.node, v.gateway, v.total)));
                address signer = _recover(digest, sigs[i]);
                if (signer != v.gateway) revert BadSignature(id, signer);
            }
            Gateway storage g = gateways[v.gateway];
            if (!g.registered) revert NotGateway(v.gateway);
            uint256 amount = uint256(v.total - before.paid) * weiPerMicroCredit;
            uint256 unclaimed = before.unclaimed + amount;
            if (unclaimed > type(uint192).max) revert TooMuch(type(uint192).max - before.unclaimed, amount);
            pairs[pair] = Pair(v.total, uint192(unclaimed));
            _draw(g, v.gateway, amount);
            emit Settled(id, v.node, v.gateway, amount);
        }
    }

    /// Takes `amount` from the gateway's deposit, then from its deposit on
    /// the way out.
    function _draw(Gateway storage g, address gateway, uint256 amount) private {
        uint256 free = g.deposit;
        if (free >= amount) {
            g.deposit = uint128(free - amount);
            return;
        }
        uint256 leaving = withdrawing[gateway].amount;
        if (free + leaving < amount) revert InsufficientDeposit(gateway, free + leaving, amount);
        g.deposit = 0;
        withdrawing[gateway].amount = leaving - (amount - free);
    }

    /// Pays the caller what it earned: what was settled to it by each of
    /// `fromGateways`, and its shares as an accuser.
    function claim(address[] calldata fromGateways) external {
        uint256 amount = earningsOf[msg.sender];
        if (amount != 0) earningsOf[msg.sender] = 0;
        for (uint256 i = 0; i < fromGateways.length; i++) {
            Pair storage p = pairs[pairKey(fromGateways[i], msg.sender)];
            amount += p.unclaimed;
            p.unclaimed = 0;
        }
        if (amount == 0) revert Nothing();
        emit Claimed(msg.sender, amount);
        _send(msg.sender, amount);
    }

    /// What `claim(fromGateways)` would pay `who`.
    function claimable(address who, address[] calldata fromGateways) external view returns (uint256 amount) {
        amount = earningsOf[who];
        for (uint256 i = 0; i < fromGateways.length; i++) {
            amount += pairs[pairKey(fromGateways[i], who)].unclaimed;
        }
    }

    // ------------------------------------------------------------------
    // Slashing
    // ------------------------------------------------------------------

    /// Slashes everything `node` has at stake (unstaking included) for the
    /// conviction (node, model, evidence hash), once `quorum` registered
    /// auditors signed it. `sigs` are sorted by signer address (ascending,
    /// so no auditor counts twice). The caller is the accuser and must be a
    /// registered auditor; it earns `accuserSharePpm` of the stake.
    function slash(address node, bytes32 model, bytes32 evidence, Sig[] calldata sigs) external {
        if (!isGateway(msg.sender)) revert NotGateway(msg.sender);
        bytes32 conviction = keccak256(abi.encode(CONVICTION_TYPEHASH, node, model, evidence));
        if (slashed[conviction]) revert AlreadySlashed(conviction);
        bytes32 digest = _digest(_domainSeparator(), conviction);
        address last = address(0);
        for (uint256 i = 0; i < sigs.length; i++) {
            address signer = _recover(digest, sigs[i]);
            if (signer == address(0)) revert BadSignature(conviction, signer);
            if (signer <= last) revert UnsortedSigners();
            if (!isGateway(signer)) revert NotGateway(signer);
            last = signer;
        }
        if (sigs.length < quorum) revert TooFewSignatures(sigs.length, quorum);
        uint256 amount = stakes[node] + unstaking[node].amount;
        if (amount == 0) revert Nothing();
        stakes[node] = 0;
        unstaking[node].amount = 0;
        slashed[conviction] = true;
        uint256 share = amount * accuserSharePpm / 1_000_000;
        earningsOf[msg.sender] += share;
        burned += amount - share;
        emit Slashed(node, conviction, msg.sender, amount, share);
    }

    // ------------------------------------------------------------------
    // Views
    // ------------------------------------------------------------------

    /// Whether `who` is a registered gateway (auditor).
    function isGateway(address who) public view returns (bool) {
        return gateways[who].registered;
    }

    /// Wei `node` has at stake (unstaking amounts not counted).
    function stakeOf(address node) external view returns (uint256) {
        return stakes[node];
    }

    /// Wei of `gateway`'s deposit free to pay vouchers (amounts on their way
    /// out not counted).
    function depositOf(address gateway) external view returns (uint256) {
        return gateways[gateway].deposit;
    }

    /// Whether the voucher `id` is paid: the total it names is, on its pair.
    function settled(bytes32 id) external view returns (bool) {
        return pairs[bytes24(id)].paid >= uint64(uint256(id));
    }

    /// Micro-credits paid so far from `gateway` to `node`.
    function paidTo(address gateway, address node) external view returns (uint64) {
        return pairs[pairKey(gateway, node)].paid;
    }

    /// The key of a (gateway, node) pair: the first 24 bytes of
    /// keccak256(gateway, node).
    function pairKey(address gateway, address node) public pure returns (bytes24) {
        return bytes24(keccak256(abi.encodePacked(gateway, node)));
    }

    /// A voucher's id: its pair's key, then its total (8 bytes), so the id
    /// alone says whether it is paid.
    function voucherId(address gateway, address node, uint64 total) external pure returns (bytes32) {
        return _voucherId(pairKey(gateway, node), total);
    }

    /// The EIP-712 domain separator signatures are made under.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparator();
    }

    // ------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------

    function _domainSeparator() private view returns (bytes32) {
        return keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256("Hotpot Market"), keccak256("1"), block.chainid, address(this))
        );
    }

    function _voucherId(bytes24 pair, uint64 total) private pure returns (bytes32) {
        return bytes32(pair) | bytes32(uint256(total));
    }

    function _digest(bytes32 domain, bytes32 structHash) private pure returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", domain, structHash));
    }

    /// The signer of `digest`, or address(0) for a malformed or malleable
    /// signature.
    function _recover(bytes32 digest, Sig calldata sig) private pure returns (address) {
        if (uint256(sig.s) > HALF_ORDER || (sig.v != 27 && sig.v != 28)) return address(0);
        return ecrecover(digest, sig.v, sig.r, sig.s);
    }

    function _send(address to, uint256 amount) private {
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }
}
