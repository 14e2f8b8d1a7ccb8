using Npcd;
using UnityEngine;
using UnityEngine.Events;

/// <summary>An NPC that says lines of its persona. A line still streaming when the
/// GameObject is destroyed (or a new line starts) is cancelled. Structured lines also say
/// what the NPC feels and does: onEmotion and onAction fire as those arrive, after some of
/// the text and before the line ends. With a segmentation, onSentence fires with each complete
/// sentence (or clause) while the line streams: hand it to text-to-speech, which can then start
/// speaking before the NPC has finished generating.</summary>
public sealed class NpcSpeaker : MonoBehaviour
{
    public string persona = "town_guard";
    public string npcId = "guard-1";
    public SpeechBubble bubble;

    [Header("Actions and emotions")]
    [Tooltip("Ask for structured lines: the reply comes with one of the persona's emotions and actions")]
    public bool structured;
    [Tooltip("The persona's actions valid right now, by name (empty: all of them); not empty implies structured")]
    public string[] allowedActions = new string[0];
    [Tooltip("(action name, its arguments as a JSON object) when the NPC decides what it does")]
    public UnityEvent<string, string> onAction = new UnityEvent<string, string>();
    [Tooltip("(emotion label) when the NPC's feeling for the line is known")]
    public UnityEvent<string> onEmotion = new UnityEvent<string>();

    [Header("Text-to-speech and memory")]
    [Tooltip("Sentence or Clause: onSentence fires with each complete sentence (or clause)")]
    public Segmentation segmentation = Segmentation.None;
    [Tooltip("(index, text) of each complete sentence, in order; together they are the line's text")]
    public UnityEvent<int, string> onSentence = new UnityEvent<int, string>();
    [Tooltip("The conversation the NPC's lines belong to (e.g. its npcId): the daemon remembers the turns; empty: none")]
    public string conversation = "";

    NpcdLine current;

    /// <summary>Asks the NPC to answer `line`; the bubble fills as the text arrives.</summary>
    public NpcdLine Answer(string speaker, string line)
    {
        CancelCurrent();
        var request = new LineRequest(persona, line) { Speaker = speaker, NpcId = npcId, Priority = Priority.Player };
        request.Context["location"] = gameObject.scene.name;
        request.Structured = structured;
        request.Segmentation = segmentation;
        if (!string.IsNullOrEmpty(conversation)) request.Conversation = conversation;
        foreach (var action in allowedActions)
        {
            if (!string.IsNullOrEmpty(action)) request.Actions.Add(new ActionSpec(action));
        }
        current = NpcdConnection.Instance.Client.Say(request);
        current.ActionChosen += OnActionChosen;
        current.EmotionChanged += OnEmotionChanged;
        current.SentenceReady += OnSentenceReady;
        if (bubble != null) bubble.Show(current);
        return current;
    }

    void OnActionChosen(NpcdLine line, NpcdAction action)
    {
        if (this != null && line == current) onAction.Invoke(action.Name, action.ArgsJson);
    }

    void OnEmotionChanged(NpcdLine line, string label)
    {
        if (this != null && line == current) onEmotion.Invoke(label);
    }

    void OnSentenceReady(NpcdLine line, NpcdSentence sentence)
    {
        if (this != null && line == current) onSentence.Invoke(sentence.Index, sentence.Text);
    }

    void CancelCurrent()
    {
        if (current != null && !current.IsDone) current.Cancel();
        current = null;
    }

    void OnDestroy()
    {
        if (NpcdConnection.Instance != null) CancelCurrent();
    }
}
